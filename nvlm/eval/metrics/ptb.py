"""A pure-Python stand-in for the Stanford PTBTokenizer that pycocoevalcap 1.2 runs (CoreNLP 3.4.1,
``PTBTokenizer -preserveLines -lowerCase``: the lexer's default options plus ``tokenizeNLs``).

The rules are those of CoreNLP 3.4.1's ``PTBLexer.flex`` (read, not copied), in its order, applied as JFlex
applies them: at each position the rule with the longest match wins, its trailing context (``r1/r2``)
counting in the length, and the earlier rule wins a tie; ``%caseless``: a letter written as such matches
either case ("N'T", "Dr." and "dr."), a character class keeps its case. Each rule here is a regular
expression with a ``tok`` group (the token) followed by the trailing context; a rule made of alternatives
of different lengths is split into one rule per alternative, so that Python's first-match alternation
cannot choose a shorter one. The lexer's defaults hold: no americanisation, no escaping of ``/`` and
``*``, LaTeX quotes (``"`` -> ````/``''``), ``(`` -> ``-LRB-`` and the other brackets, ``...`` for ellipses,
``--`` for dashes of 3-4 hyphens and en/em dashes, ``&amp;`` -> ``&``, pound -> ``#``, cent -> ``cents``,
``½`` -> ``1/2``, a space inside a token (fractions ``2 3/4``, phone numbers, SGML tags) -> U+00A0, and
characters that no rule takes deleted.

Checked against the Java tokenizer (tests/test_eval_metrics.py, and a local fuzz of 13,000 lines with no
difference). Not carried over: Java's lists of letters and digits (Python's classes stand in for them).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_LET = r"[^\W\d_\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u209F\u2150-\u218F\u2460-\u24FF]"  # [:letter:]
_L = rf"(?:{_LET}|&[aeiouAEIOU](?:acute|grave|uml);|[\u00AD\u0300-\u036F])"  # LETTER (SPLET, soft hyphen, marks)
_LD = rf"(?:{_L}|\d)"
_WORD = rf"{_L}{_LD}*(?:[.!?]{_L}{_LD}*)*"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = r"(?:['\u0092\u2019`\u0091\u2018\u201B]|&apos;)"
_REDAUX = rf"{_APOS}(?:[msdMSD]|re|ve|ll)"
_SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_SREDAUX = rf"n{_APOSETC}t"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NEWLINE = r"(?:\r\n|[\r\n\u2028\u2029\u000B\u000C\u0085])"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_SGML = (
    r"<(?:[!?][A-Za-z-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.-]*[ ]*=[ ]*"
    r"""(?:'[^']*'|"[^"]*")|[A-Za-z][A-Za-z0-9_:.-]*))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.-]*)[ ]*>"""
)
_NUM = r"(?:\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+)"
_ACRO = r"(?:[A-Za-z](?:\.[A-Za-z])*|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R))"
_ACRO2 = r"(?:[A-Za-z](?:\.[A-Za-z])+|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R))"
_ABBREV1 = (  # months, days, states, companies, numbers, titles after a name; [X] keeps a letter's case
    r"(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec|Mon|Tues?|Wed|Thu|Thurs|Fri"
    r"|Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|Mich|Minn|[M]iss"
    r"|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo"
    r"|Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys|tel|est|ext|sq"
    r"|Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq|etc|al|seq|Bldg)\."
)
_ABTITLE = (
    r"Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt"
    r"|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp"
    r"|Mlle|Mme|Msgr|Sfc"
)
_ABBREV4 = rf"(?:{_ABTITLE}|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl|M[ft]g|Dept)"  # and {_ACRO}
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_THING_PART = rf"(?:[dDoOlL]{_APOSETC}(?:{_LET}|\d))?(?:{_LET}|\d)+"
_THING = rf"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"
_THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{_ACRO2}\.))+"
_INSENTP = r"[,;:\u3001]"
_QUOTE_CHARS = "`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb"
_ACRONYM_NEXT = "|".join(
    f"[{w[0]}]{w[1:]}"
    for w in (  # first letter case-sensitive, as in the lexer
        "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
        r"Mr\. Ms\. Now Once One Other Our She Since So Some Such That The Their Then There These They This We "
        "When While What Yet You"
    ).split()
)
_MISC = (
    re.escape("+%&~^|\\") + "\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u2016\u2017"
    "\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f"
    "\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
)

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
_LEFT_QUOTES = {
    "\u0091": "`",
    "\u2018": "`",
    "\u201b": "`",
    "\u2039": "`",
    "\u0093": "``",
    "\u201c": "``",
    "\u00ab": "``",
}
_RIGHT_QUOTES = {"\u0092": "'", "\u2019": "'", "\u203a": "'", "\u0094": "''", "\u201d": "''", "\u00bb": "''"}

Action = Callable[[str], str | None]  # the matched text (trailing context excluded) -> the token, or None


def _keep(text: str) -> str:
    return text.replace("\u00ad", "")  # removeSoftHyphens


def _nbsp(text: str) -> str:
    return text.replace(" ", "\u00a0")


def _amp(text: str) -> str:
    return re.sub(r"(?i)&amp;", "&", text)


def _parens(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _quotes(left: bool) -> Action:
    """handleQuotes with LaTeX quotes: ' and " become ` and `` when probably a left quote, else ' and ''."""

    def action(text: str) -> str:
        text = re.sub(r"&apos;|'", "`" if left else "'", text)
        text = re.sub(r'"|&quot;', "``" if left else "''", text)
        return "".join(_LEFT_QUOTES.get(c, _RIGHT_QUOTES.get(c, c)) for c in text)

    return action


_LINE_END = "\n"  # tokenizeNLs: a newline ends the output line


def _skip(text: str) -> None:
    return None


# (token regex, trailing-context regex, action, characters of the match given back to the input)
_SPEC: list[tuple[str, str, Action, int]] = [
    (r"c\+\+|(?:c|f)#", "", _keep, 0),
    ("cannot", "", lambda t: t[:3], 3),
    ("'twas", "", lambda t: t[:2], 3),
    ("'tis", "", lambda t: t[:2], 2),
    ("gonna|gotta|lemme|gimme|wanna", "", lambda t: t[:3], 2),  # split: can not, gon na, 't was
    (_SGML, "", _nbsp, 0),
    (r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", "", lambda t: "--", 0),
    ("&amp;", "", _amp, 0),
    (r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", "", _keep, 0),
    (_WORD, _REDAUX, _keep, 0),
    (_SWORD, _SREDAUX, _keep, 0),
    (_WORD, "", _keep, 0),
    *(
        (alt, "", _keep, 0)
        for alt in (  # APOWORD, one rule per alternative
            rf"{_APOS}n{_APOS}?",
            rf"[lLdDjJ]{_APOS}",
            rf"Dunkin{_APOS}",
            rf"somethin{_APOS}",
            rf"ol{_APOS}",
            rf"{_APOS}em",
            rf"[A-HJ-XZn]{_APOSETC}{_LET}{{2,}}",
            rf"{_APOS}[2-9]0s",
            rf"{_APOS}till?",
            rf"{_LET}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_LET}*",
            rf"{_APOS}cause",
            r"cont'd\.?",
            "'twas",
            "nor'easter",
            "c'mon",
            "e'er",
            "s'mores",
            "ev'ry",
            "li'l",
            "nat'l",
            rf"O{_APOSETC}o",
        )
    ),
    (rf"y{_APOS}", _LET, _keep, 0),
    (r"https?://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]", "", _keep, 0),
    (
        r"(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
        r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?:com|net|org|edu))"
        r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?",
        "",
        _keep,
        0,
    ),
    (
        r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
        r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?",
        "",
        _keep,
        0,
    ),
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_L}+", "", _keep, 0),
    (_REDAUX, "[^A-Za-z]", _quotes(False), 0),
    (_SREDAUX, "[^A-Za-z]", _quotes(False), 0),
    (r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", "", _keep, 0),
    (rf"[-+]?{_NUM}", "", _keep, 0),
    (r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)", "", _keep, 0),
    (r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", "", _nbsp, 0),
    ("[" + "".join(_FRACTIONS) + "\u2155-\u215e]", "", lambda t: _FRACTIONS.get(t, t), 0),
    (
        rf"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{_APOS}n|c{_APOS}est",
        "",
        _amp,
        0,
    ),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", "", _keep, 0),
    (r"[A-Z]*\$|#", "", _keep, 0),
    (
        "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
        "",
        lambda t: _CURRENCY.get(t, t),
        0,
    ),
    # an acronym before a word that often starts a sentence: the period also ends the sentence
    (rf"{_ACRO}\.", rf"{_SPACENL}+(?:{_ACRONYM_NEXT}|{_SGML}){_SPACENL}", lambda t: t if len(t) > 2 else t[0], 1),
    (r"(?:ca|figs?|prop|nos?|art|bldg|pp|op)\.", rf"{_SPACENL}?\d", _keep, 0),
    (r"(?:pt[eyEY]|co)\.", rf"{_SPACE}(?:ltd|lim)", _keep, 0),
    (_ABBREV1, rf"{_SPACENL}(?:{_SPACENL}|[A-Z\u00C0-\u00D6\u00D8-\u00DE]|{_SGML})", _keep, 1),
    (_ABBREV1, r"[\s\S]{2}", _keep, 0),
    (_ABBREV1, "", _keep, 1),
    (rf"{_ABBREV4}\.", "", _keep, 0),
    (rf"{_ACRO}\.", "", _keep, 0),
    (_ABBREV4, _SPACE, _keep, 0),
    (_ACRO, _SPACE, _keep, 0),
    (_ACRO, _SPACENL, _keep, 0),
    (r"['\u0092\u2019][0-9][0-9]|&apos;[0-9][0-9]", _SPACENL, _keep, 0),
    (
        r"(?:[^\W_]+)(?:\.[^\W_]+)*\.(?:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg"
        r"|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)",
        rf"(?:{_SPACENL}|[.?!,])",
        _keep,
        0,
    ),
    (rf"{_WORD}\.", _INSENTP, _keep, 0),
    (
        r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00A0])?[0-9]{2,4}[- \u00A0])"
        r"[0-9]{3,4}[- \u00A0]?[0-9]{3,5}"
        r"|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
        "",
        lambda t: _parens(_nbsp(t)),
        0,
    ),
    (r'"|&quot;', "[A-Za-z0-9$]", _quotes(True), 0),
    (r'"|&quot;', "", _quotes(False), 0),
    ("\x7f", "", _skip, 0),
    ("<|&lt;", "", lambda t: "<", 0),
    (">|&gt;", "", lambda t: ">", 0),
    (r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", "[^A-Za-z0-9]", _parens, 0),
    (
        r"[\^x=~<>]\.\[\^x=~<>]|[-\^x=~<>']_[-\^x=~<>']|\([-\^x=~<>'][_.]?[-\^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)",
        "",
        _parens,
        0,
    ),
    (r"[(){}\[\]]", "", lambda t: _BRACKETS[t], 0),
    (r"-+", "", lambda t: "--" if 3 <= len(t) <= 4 else t, 0),
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", "", lambda t: "...", 0),
    (r"@+|#+|_+", "", _keep, 0),
    (r"\*+|(?:\\\*){1,3}", "", _keep, 0),
    (_INSENTP, "", _keep, 0),
    (r"[?!]+", "", _keep, 0),
    ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", "", _keep, 0),
    ("=", "", _keep, 0),
    ("/", "", _keep, 0),
    (rf"{_HTHING}\.", _INSENTP, _keep, 0),
    (_HTHING, "", _keep, 0),
    (rf"{_THING}\.", _INSENTP, _keep, 0),
    (_THING, "", _keep, 0),
    (rf"{_THINGA}\.", _INSENTP, _amp, 0),
    (_THINGA, "", _amp, 0),
    ("'", "[A-Za-z][^ \t\n\r\u00a0]", _quotes(True), 0),
    (_REDAUX, "", _quotes(False), 0),
    (_SREDAUX, "", _quotes(False), 0),
    *((alt, "", _quotes(False), 0) for alt in (_APOS, "''", f"[{_QUOTE_CHARS}]{{1,2}}")),
    ("<<|>>", "", _keep, 0),
    (f"[{_MISC}]", "", _keep, 0),
    (r"\0|[ \t\u00A0\u2000-\u200A\u3000]+|[\u200B\u200E\u200F\uFEFF]|&nbsp;", "", _skip, 0),
    (_NEWLINE, "", lambda t: _LINE_END, 0),
]


def _caseless(pattern: str) -> str:
    """JFlex's ``%caseless``: letters written as such match either case; character classes keep theirs."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            step = 6 if pattern[i + 1] == "u" else 2
            out.append(pattern[i : i + step])
            i += step
        elif c == "[":
            j = i + 1 + (pattern[i + 1] == "^") + (pattern[i + 1 : i + 3] in ("]", "^]"))
            while pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            out.append(pattern[i : j + 1])
            i = j + 1
        elif c == "(" and pattern[i + 1] == "?":  # (?: group
            out.append("(?:")
            i += 3
        else:
            out.append(f"[{c}{c.swapcase()}]" if c.isalpha() and c.swapcase() != c else c)
            i += 1
    return "".join(out)


_RULES = [
    (re.compile(f"(?P<tok>{_caseless(tok)})(?:{_caseless(trail)})"), action, back) for tok, trail, action, back in _SPEC
]


def ptb_lines(lines: list[str]) -> list[list[str]]:
    """PTBTokenizer's tokens (case kept) of each line of a file made of ``lines`` joined by newlines, as
    pycocoevalcap writes it (newlines inside a line become spaces; ``\\r`` and the other line separators
    too, which in pycocoevalcap would shift the later lines). Characters that no rule takes are deleted."""
    text = "\n".join(re.sub(r"[\r\n\u2028\u2029\u000B\u000C\u0085]", " ", line) for line in lines)
    out: list[list[str]] = [[]]
    pos = 0
    while pos < len(text):
        best, best_len = None, 0
        for rx, action, back in _RULES:
            m = rx.match(text, pos)
            if m and m.end() - pos > best_len:
                best, best_len = (m.group("tok"), action, back), m.end() - pos
        if best is None:  # untokenizable: deleted
            pos += 1
            continue
        tok, action, back = best
        token = action(tok)
        if token == _LINE_END:
            out.append([])
        elif token:
            out[-1].append(token)
        pos += len(tok) - back
    return out
