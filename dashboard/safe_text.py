"""Text taken from data, shown as text: never Markdown, HTML, a link or an image.

Streamlit renders Markdown in st.markdown, st.caption, st.error/warning/info/success, titles and
headers, and in widget labels, radio options, metric values, image captions, page-link labels,
help tooltips and st.table cells. A label, text, file name, model id or URL parameter put there
unescaped can fetch a URL (``![b](http://host/beacon.png)``) or pose as a link
(``[Session expired: re-enter token](http://evil)``). Every such value goes through
:func:`plain` (or :func:`code` inside a code span) before it is interpolated. Dataframe cells,
selectbox options, chart text and Vega tooltips (which escape HTML) show text as it is.
"""
from __future__ import annotations

import re

_MD_SPECIAL = set("\\`*_{}[]()<>#+-.!|~:$=&\"'@%^;,?/")


WORD_JOINER = "\u2060"
# GFM's autolink literals (http://, https://, www., mailto:, xmpp:, an e-mail address) are found
# after escapes are resolved, so escaping cannot stop them: a WORD JOINER (invisible, zero width)
# after the scheme's letters, after "www" and after "@" breaks each pattern.
_AUTOLINK = re.compile(r"(?i)(https?|mailto|xmpp)(?=:)|\bwww(?=\.)|@")


def plain(value) -> str:
    """``value`` as Markdown source that renders as exactly its text: every ASCII punctuation
    character is backslash-escaped (CommonMark lets any be), so labels, texts, file names and URL
    parameters taken from data can never become links, images (a fetched URL), emphasis, HTML,
    Streamlit's ``:color[...]``/``:icon:`` directives or math; an autolink literal (``http://``,
    ``www.``, an e-mail address) gets an invisible WORD JOINER that GFM does not accept in one.
    Line breaks stay breaks."""
    text = _AUTOLINK.sub(lambda m: m.group(0) + WORD_JOINER, "" if value is None else str(value))
    out = []
    for ch in text:
        if ch in _MD_SPECIAL:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("  \n")
        elif ch == "\r" or (ord(ch) < 32 and ch != "\t"):
            continue
        else:
            out.append(ch)
    return "".join(out)


def code(value) -> str:
    """``value`` as an inline code span (rendered verbatim, never as Markdown): fenced by more
    backticks than it contains, on one line."""
    text = " ".join(("" if value is None else str(value)).split())
    longest, cur = 0, 0
    for ch in text:
        cur = cur + 1 if ch == "`" else 0
        longest = max(longest, cur)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}" if text else ""
