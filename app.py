"""DipSVD Studio: the Streamlit entry point. It only routes; each page lives in pages/."""
import streamlit as st

from studio import ui

st.set_page_config(page_title="DipSVD Studio", page_icon="🗜️", layout="wide")

PAGES = {
    "Prepare": [st.Page("pages/model_data.py", title="Model and data", icon="📦", default=True)],
    "Inspect": [st.Page("pages/importance.py", title="Importance", icon="🔍"),
                st.Page("pages/allocation.py", title="Allocation", icon="🎚️")],
    "Compress": [st.Page("pages/compress.py", title="Compress and evaluate", icon="🗜️"),
                 st.Page("pages/side_by_side.py", title="Side by side", icon="💬"),
                 st.Page("pages/export.py", title="Export", icon="💾")],
}

ui.keep_widget_state()
page = st.navigation(PAGES)
with st.sidebar:
    st.caption("DipSVD Studio · SVD compression with dual importance protection (arXiv 2506.20353)")
page.run()
