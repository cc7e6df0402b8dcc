"""The CLIP Atlas dashboard: `streamlit run dashboard/app.py` (entry that only routes), one file
per page in dashboard/views/, shared widgets, cached warehouse access and live analyses."""
