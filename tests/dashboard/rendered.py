"""What a page's Markdown source shows: AppTest hands back the source of st.markdown, captions,
alerts and metric values, in which dashboard.safe_text has escaped every punctuation character of
data-derived text. Tests compare what a person reads."""
from __future__ import annotations

import re

_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")      # CommonMark: a backslash before ASCII punctuation


def shown(markdown) -> str:
    """``markdown`` as read: backslash escapes removed, invisible word joiners (which break autolinks,
    dashboard/safe_text.py) dropped."""
    return _ESCAPE.sub(r"\1", str(markdown)).replace("\u2060", "")
