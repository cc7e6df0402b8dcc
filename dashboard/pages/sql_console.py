"""SQL console: placeholder until warehouse/console.py lands."""
import streamlit as st

st.title("SQL console")
