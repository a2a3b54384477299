"""DipSVD Studio: the Streamlit entry point (placeholder until the app pages land)."""
import streamlit as st

st.set_page_config(page_title="DipSVD Studio", layout="wide")
st.title("DipSVD Studio")
st.write("The workbench pages are under construction. The library and CLI work today: "
         "`python -m dipsvd_core compress --help`.")
