"""DipSVD Studio: the Streamlit entry point. It only routes; each page lives in pages/."""
import streamlit as st

from studio.jobs import settle_heap_at_start

# The page icon is an emoji: a material icon there is fetched as an image from a font CDN, which fails offline
st.set_page_config(page_title="DipSVD Studio", page_icon="🗜️", layout="wide")

PAGES = {
    "Prepare": [st.Page("pages/model_data.py", title="Model and data", icon=":material/deployed_code:", default=True)],
    "Inspect": [st.Page("pages/importance.py", title="Importance", icon=":material/insights:"),
                st.Page("pages/allocation.py", title="Allocation", icon=":material/tune:")],
    "Compress": [st.Page("pages/compress.py", title="Compress and evaluate", icon=":material/compress:"),
                 st.Page("pages/side_by_side.py", title="Side by side", icon=":material/forum:"),
                 st.Page("pages/export.py", title="Export", icon=":material/save:")],
}

settle_heap_at_start()  # the imports' objects stay for the process: full collections need not walk them
page = st.navigation(PAGES)
with st.sidebar:
    st.caption("DipSVD Studio · SVD compression with dual importance protection (arXiv 2506.20353)")
page.run()
