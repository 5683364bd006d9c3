"""Pull the final answer out of a solution, in the search-and-learn / Qwen2.5-Math parser order.

"final answer is $...$", else the last brace-matched `\\boxed{}` (or `\\fbox{}`), else "The answer is ...", else
GSM8K's `#### n`, else the last number in the text.
"""
from __future__ import annotations

import re

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*")
_FINAL_ANSWER = re.compile(r"final answer is:?\s*\$+((?:\\\$|[^$])+?)\$+", re.IGNORECASE)
_THE_ANSWER = re.compile(r"answer is:?[ \t]*([^\n]+)", re.IGNORECASE)
_GSM8K = re.compile(r"####[ \t]*([^\n]+)")
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?:(?<![\w)\]}])-)?\.\d+")


def boxed_contents(text: str) -> list[str]:
    """Contents of every complete `\\boxed{...}` / `\\fbox{...}` (nested braces matched), in order.

    An unclosed box (a truncated generation) is skipped. `\\boxed 5` (no braces) yields "5".
    """
    out: list[str] = []
    for m in _BOX_START.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{" and text[j - 1] != "\\":
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth == 0 and j < len(text):
                out.append(text[i + 1 : j].strip())
        elif text[m.end() - 1].isspace():
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                out.append(token.group(0))
    return out


def last_boxed(text: str) -> str | None:
    """The last complete, non-empty `\\boxed{}` / `\\fbox{}` content, or None."""
    for content in reversed(boxed_contents(text)):
        if content:
            return content
    return None


def _clean_answer_phrase(s: str) -> str | None:
    """Tidy the text after "The answer is": cut at the sentence end, unwrap `$...$` and `\\boxed{}`."""
    s = s.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        return boxed
    if _BOX_START.search(s):  # an unclosed box: a truncated generation
        return None
    m = re.match(r"(.+?)(?:\.\s|\.$|$)", s)  # up to the first full stop that ends the sentence
    s = m.group(1) if m else s
    s = s.strip().strip("$").strip()
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    s = s.rstrip(".,;:!").strip()
    return s or None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a whole solution, as a bare string (not normalised), or None when there is none."""
    if not text:
        return None
    finals = _FINAL_ANSWER.findall(text)
    if finals:
        inner = finals[-1].strip()
        boxed = last_boxed(inner)
        ans = boxed if boxed is not None else inner.rstrip(".").strip()
        if ans:
            return ans
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for regex in (_THE_ANSWER, _GSM8K):
        hits = regex.findall(text)
        if hits:
            ans = _clean_answer_phrase(hits[-1])
            if ans:
                return ans
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", "")
    return None
