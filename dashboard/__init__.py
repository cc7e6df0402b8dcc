"""The CLIP Atlas dashboard: `streamlit run dashboard/app.py` (entry that only routes), one file
per page in dashboard/pages/, shared widgets, cached warehouse access and live analyses."""
