"""Step 1b of the flow: text sources and token windows.

Sources (docs/DESIGN.md section 6):
- `wiki`: the English Wikipedia extract shipped in gensim's wheel, split by article: the first
  half of the articles is `calib`, the second half `eval`. Disjoint by construction.
- `wiki-chat`: the same articles' prose paragraphs in passages (about CHAT_PASSAGE characters), every other
  passage framed as one chat exchange in the model's own chat template: the user asks about the article's subject
  (CHAT_ASK), the assistant answers with the passage. An instruct model is then calibrated on the format it is
  used in (the Side-by-side page's prompts go through the chat template); refine fitted on plain wiki alone made
  chat answers repeat (bench/RESULTS.md, issue 25). A tokenizer without a chat template gets the plain passages.
- `news`: gensim's `lee_background.cor` (one news story a line), split by story: the first half is `eval`, the
  second half `calib`, so a news calibration never sees the stories a news evaluation reads (the evaluation reads the
  leading windows of the first half, as it read the leading windows of the whole file before the split).
- `mix` (MIX): windows drawn from several of the sources above in set proportions (`mix` alone is MIX_DEFAULT;
  `mix:wiki-chat=2,news=1,wiki=1` names them), each source's windows drawn as that source's own. The held-out
  windows refine checks on (every HOLDOUT-th) are apportioned among the sources like the others, so refine's and the
  probes' held-out checks read every kind of text in the mix (mix_plan). The default calibration (DEFAULT_CALIB):
  on the quality panel, text in none of its sources, it beat wiki-chat alone at 0.2 (bench/RESULTS.md, issue 35).
- `self` (SELF): text the model writes itself from short prompts (engine/self_text.py); for calibration only, and
  only where the model is at hand (a `writer`, which run/calibration.py gives).
- The quality panel, for evaluation only (PANEL): `python-docs` (CPython's reference manual as pydoc ships it, in
  every Python: technical writing), `kjv` (narrative books of the King James Bible, through Debian's `bible-kjv`:
  book prose) and `fortunes` (Debian's `fortunes`: quotations, jokes and dialogue). Each is split in halves like
  news; none of them is in any calibration source.
- `wikitext2`, `ptb`, `c4`: through `datasets`, when the hub or its local cache has them.
- a local `.txt` (blank-line separated documents) or `.jsonl` (a "text" field a line) path.

Windows never pad: calibration windows are distinct non-overlapping chunks chosen by a seeded
permutation; evaluation windows are the leading non-overlapping chunks, remainder dropped. If the
tokenizer adds a BOS token to a text, every window starts with BOS.
"""
from __future__ import annotations

import bz2
import functools
import json
import os
import re
from pathlib import Path

import torch

from ..common.cache import cache_dir, make_key
from ..common.errors import DipSVDError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
HUB_SETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"calib": "train", "eval": "test"}, "text"),
    "ptb": ("ptb_text_only", "penn_treebank", {"calib": "train", "eval": "test"}, "sentence"),
    "c4": ("allenai/c4", "en", {"calib": "train", "eval": "validation"}, "text"),
}
CHAT = "wiki-chat"
MIX = "mix"
SELF = "self"  # the model's own text (self_text.py, which reads the prompts from here)
# the default mix's shares: the chat framing the app is used in, wiki, and the news calibration half
MIX_DEFAULT = {CHAT: 2, "wiki": 1, "news": 1}
PANEL = ("python-docs", "kjv", "fortunes")  # evaluation texts of other kinds than any calibration source
SOURCES = ("wiki", CHAT, "news", SELF, MIX, *HUB_SETS, *PANEL)
CALIB_SOURCES = tuple(s for s in SOURCES if s not in PANEL)  # the panel stays out of every calibration
EVAL_SOURCES = tuple(s for s in SOURCES if s not in (MIX, SELF))  # a mix is evaluated source by source
HOLDOUT = 4  # every HOLDOUT-th calibration window is held out by refine: fitted never, scored always
KJV_BOOKS = ("Genesis", "Exodus", "Ruth", "Esther", "Luke", "John", "Acts")  # narrative books
FORTUNES = Path("/usr/share/games/fortunes")
DEFAULT_CALIB = MIX  # the calibration text the CLI and the app start from (MIX_DEFAULT's shares)
CHAT_ASK = "Tell me about {subject}."
CHAT_PASSAGE = 1500  # characters of whole paragraphs a passage gathers before it is closed
CHAT_PARAGRAPH = 200  # wiki-chat keeps the paragraphs longer than this (characters): prose
# the calibration the CLI and the app start from, windows x tokens: at fewer tokens, or in shorter windows, the
# refined builds keep fewer blocks refined and gain less (bench/RESULTS.md, "Calibration size", issue 25)
DEFAULT_WINDOWS, DEFAULT_SEQLEN = 32, 512


def _gensim_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise DipSVDError("gensim is not installed; it ships the default text. Run `pip install gensim`")
    return Path(spec.origin).parent / "test" / "test_data"


def _clean_wiki(markup: str) -> str:
    """Wiki markup to prose: gensim strips links and templates; we drop emphasis quotes and tables."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^\s*=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)  # headings -> plain lines
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("|", "{", "!", "*", "#", ":"))]
    return "\n".join(lines)


def wiki_articles() -> list[str]:
    """All prose articles of the gensim Wikipedia extract, in file order (cached as JSON)."""
    path = _gensim_data() / WIKI_FILE
    if not path.exists():
        raise DipSVDError(f"the gensim Wikipedia extract is missing ({path}); reinstall gensim")
    cached = cache_dir() / "text" / f"wiki-{make_key(str(path), path.stat().st_size)}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    from gensim.corpora.wikicorpus import extract_pages

    docs = []
    with bz2.open(path) as f:
        for _title, markup, _pid in extract_pages(f):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wiki(markup)
            if len(text) > 200:
                docs.append(text)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(docs))
    return docs


def _hub_docs(name: str, split: str) -> list[str]:
    path, config, splits, field = HUB_SETS[name]
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=splits[split])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DipSVDError(
            f"dataset '{name}' could not be loaded through `datasets` ({first}). It needs the hub or a "
            "local datasets cache; offline, use 'wiki', 'news', or a local .txt/.jsonl path") from e
    return [t for t in ds[field] if t and t.strip()]


def _local_docs(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DipSVDError(f"{path}: line {i} is not JSON; a .jsonl file needs one JSON object a line") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DipSVDError(f"{path}: line {i} has no string field 'text'")
            docs.append(row["text"])
        return docs
    text = path.read_text(encoding="utf-8", errors="replace")
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def load_documents(source: str, split: str = "eval") -> list[str]:
    """The documents of a text source; `split` is 'calib' or 'eval'."""
    if split not in ("calib", "eval"):
        raise ValueError(split)
    if source in ("wiki", CHAT):  # wiki-chat's framing needs the tokenizer (chat_documents)
        docs = wiki_articles()
        half = len(docs) // 2
        return docs[:half] if split == "calib" else docs[half:]
    if source == "news":
        path = _gensim_data() / NEWS_FILE
        return _halves([ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()], split)
    if source in PANEL:
        return _halves(_PANEL_READERS[source](), split)
    if source in HUB_SETS:
        return _hub_docs(source, split)
    path = Path(os.path.expanduser(source))
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise DipSVDError(f"text file not found: {source}; check the path")
        docs = _local_docs(path)
        if not docs:
            raise DipSVDError(f"{source} holds no text")
        return docs
    raise DipSVDError(f"unknown text source '{source}'; use one of {', '.join(SOURCES)}, or a .txt/.jsonl path")


def _halves(docs: list[str], split: str) -> list[str]:
    """An evaluation source's two parts: the first half of its documents is `eval`, the second `calib`."""
    half = (len(docs) + 1) // 2
    return docs[:half] if split == "eval" else docs[half:]


def _python_docs() -> list[str]:
    from pydoc_data.topics import topics

    texts = (text.strip() for _, text in sorted(topics.items()))
    return list(dict.fromkeys(t for t in texts if len(t) > 200))  # several topics share one text


def _kjv() -> list[str]:
    """The narrative books of the King James Bible, a document per chapter, from Debian's `bible` program."""
    import shutil
    import subprocess

    if shutil.which("bible") is None:
        raise DipSVDError("text 'kjv' needs Debian's King James Bible: run `apt-get install bible-kjv`")
    docs = []
    for book in KJV_BOOKS:
        out = subprocess.run(["bible", "-f", f"{book}1:1-199:199"], capture_output=True, text=True, check=True).stdout
        chapter: list[str] = []
        for line in out.splitlines():
            m = re.match(r"^\w+?(\d+):(\d+) (.*)$", line.strip())
            if m and m.group(2) == "1" and chapter:
                docs.append(" ".join(chapter))
                chapter = []
            if m:
                chapter.append(m.group(3))
            elif line.strip() and chapter:
                chapter.append(line.strip())
        if chapter:
            docs.append(" ".join(chapter))
    return docs


def _fortunes() -> list[str]:
    """Debian's English fortunes (not the offensive ones), one cookie a document, file by file in name order."""
    files = sorted(p for p in FORTUNES.glob("*") if p.is_file() and not p.suffix and p.name != "ascii-art")
    if not files:
        raise DipSVDError("text 'fortunes' needs Debian's fortunes: run `apt-get install fortunes`")
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [d.strip() for d in text.split("\n%\n") if len(d.strip()) > 40]
    return docs


_PANEL_READERS = {"python-docs": _python_docs, "kjv": _kjv, "fortunes": _fortunes}


def mix_shares(source: str) -> dict[str, float] | None:
    """The shares of a mixed source (`mix`, or `mix:wiki-chat=2,news=1`), None for any other source."""
    if source != MIX and not source.startswith(MIX + ":"):
        return None
    if source == MIX:
        return dict(MIX_DEFAULT)
    shares = {}
    for part in source[len(MIX) + 1:].split(","):
        name, _, value = part.strip().partition("=")
        try:
            share = float(value or 1)
        except ValueError:
            share = -1.0
        if name not in SOURCES or name == MIX or name in PANEL or not share > 0:
            raise DipSVDError(f"'{part.strip()}' in '{source}' is not SOURCE=SHARE with a positive share and a source "
                              f"among {', '.join(s for s in SOURCES if s != MIX and s not in PANEL)}; e.g. "
                              f"mix:wiki-chat=2,news=1")
        shares[name] = shares.get(name, 0.0) + share
    return shares


def _apportion(n: int, shares: dict[str, float]) -> dict[str, int]:
    """n split by the shares, largest remainder first (ties in the order given)."""
    total = sum(shares.values())
    exact = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def is_held(i: int, every: int = HOLDOUT) -> bool:
    """Whether calibration window i is one refine holds out: the last of each run of `every`."""
    return i % every == every - 1


def self_windows(source: str, n_windows: int) -> int:
    """How many of n calibration windows of `source` the model writes itself (the `self` source, alone or in a mix)."""
    if source == SELF:
        return n_windows
    shares = mix_shares(source)
    return mix_plan(n_windows, shares).count(SELF) if shares and SELF in shares else 0


def mix_plan(n_windows: int, shares: dict[str, float]) -> list[str]:
    """The source of each of n calibration windows: the held-out positions (every HOLDOUT-th) and the others are
    each apportioned by the shares, and each part is interleaved, so refine's held-out check reads every source
    (as soon as there are as many held-out windows as sources)."""
    held = [i for i in range(n_windows) if is_held(i)]
    fit = [i for i in range(n_windows) if not is_held(i)]
    plan = [""] * n_windows
    for positions in (held, fit):
        counts = _apportion(len(positions), shares)
        # interleave: the k-th window of a source of count c sits at (k + 0.5) / c along the part
        order = sorted(((k + 0.5) / c, i, name) for i, (name, c) in enumerate(counts.items()) for k in range(c))
        for pos, (_, _, name) in zip(positions, order):
            plan[pos] = name
    return plan


def bos_id(tokenizer) -> int | None:
    """The BOS id if this tokenizer prepends one to a plain text, else None."""
    ids = tokenizer("a")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and len(ids) > 0 and ids[0] == bos else None


def article_subject(article: str) -> str:
    """An article's subject: its opening run of capitalised words ("Abraham Lincoln (; February ..." -> "Abraham
    Lincoln"), or "this topic"."""
    m = re.match(r"[A-Z][\w'\-]*(?: [A-Z][\w'\-]*)*", article)
    return m.group(0) if m else "this topic"


def chat_documents(tokenizer, split: str) -> list[str]:
    """wiki-chat's documents (see the module docstring): wiki's articles of `split` in passages, every other one
    (the first of each article included) framed by the tokenizer's chat template as a question about the
    article's subject and the passage as the answer."""
    template = getattr(tokenizer, "chat_template", None)
    docs = []
    for article in load_documents("wiki", split):
        subject, passage, k = article_subject(article), "", 0
        for para in (p for p in article.split("\n") if len(p) > CHAT_PARAGRAPH):  # prose, not headings or lists
            passage += para + "\n"
            if len(passage) < CHAT_PASSAGE:
                continue
            text = passage.strip()
            if template and k % 2 == 0:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": CHAT_ASK.format(subject=subject)},
                     {"role": "assistant", "content": text}], tokenize=False)
            docs.append(text)
            passage, k = "", k + 1  # an article's last, shorter passage is left out
    return docs


def token_stream(tokenizer, source: str, split: str) -> torch.Tensor:
    """Join the documents with blank lines and tokenize once, without added special tokens (a chat template's
    own tokens in wiki-chat's text are read as the special tokens they are). Kept in memory per tokenizer, source
    and split (a text file's by its size and time too): tokenizing the Wikipedia half took 1.6 s a call."""
    if mix_shares(source) is not None:
        raise DipSVDError(f"'{source}' is a calibration mix; evaluate on its sources one by one "
                          f"({', '.join(mix_shares(source))})")
    if source == SELF:
        raise DipSVDError(f"'{SELF}' is text the model writes for its own calibration; evaluate on another source "
                          f"({', '.join(EVAL_SOURCES[:3])}, ...)")
    stat = os.stat(source) if os.path.isfile(source) else None
    return _tokenized(tokenizer, source, split, stat and (stat.st_size, stat.st_mtime_ns)).clone()


@functools.lru_cache(maxsize=8)
def _tokenized(tokenizer, source: str, split: str, stamp) -> torch.Tensor:
    docs = chat_documents(tokenizer, split) if source == CHAT else load_documents(source, split)
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _chunks(stream: torch.Tensor, seqlen: int, bos: int | None) -> torch.Tensor:
    body = seqlen - 1 if bos is not None else seqlen
    n = stream.numel() // body
    chunks = stream[: n * body].view(n, body)
    if bos is not None:
        chunks = torch.cat([torch.full((n, 1), bos, dtype=torch.long), chunks], dim=1)
    return chunks


def _mixed(tokenizer, source: str, n_windows: int, seqlen: int, seed: int, skip: int = 0,
           writer=None) -> torch.Tensor:
    """A mixed source's windows in mix_plan's order; with `skip`, the held-out windows after each source's own
    calibration windows (skip apportioned like the windows)."""
    shares = mix_shares(source)
    plan, before = mix_plan(n_windows, shares), mix_plan(skip, shares)  # before: the calibration's own windows
    drawn = {}
    for name in dict.fromkeys(plan):
        count = plan.count(name)
        drawn[name] = list(heldout_windows(tokenizer, name, count, seqlen, seed, before.count(name), writer) if skip
                           else calibration_windows(tokenizer, name, count, seqlen, seed, writer))
    return torch.stack([drawn[name].pop(0) for name in plan])


def _written(tokenizer, writer, first: int, n_windows: int, seqlen: int) -> torch.Tensor:
    """Windows first..first + n_windows of the text the model writes (self_text.py), in order."""
    if writer is None:
        raise DipSVDError(f"calibration text '{SELF}' is written by the model: it needs the loaded model (a writer)")
    bos = bos_id(tokenizer)
    body = seqlen - 1 if bos is not None else seqlen
    return _chunks(writer((first + n_windows) * body), seqlen, bos)[first: first + n_windows]


def calibration_windows(tokenizer, source: str, n_windows: int, seqlen: int, seed: int = 0,
                        writer=None) -> torch.Tensor:
    """`n_windows` distinct non-overlapping windows (n_windows, seqlen), chosen by a seeded permutation (a mixed
    source's: each source's own windows, in mix_plan's order). `writer(n_tokens)`: the model's own text, for
    `self`."""
    if n_windows < 1 or seqlen < 2:
        raise DipSVDError(f"need at least 1 calibration window of at least 2 tokens (got {n_windows} x {seqlen})")
    if mix_shares(source) is not None:
        return _mixed(tokenizer, source, n_windows, seqlen, seed, writer=writer)
    if source == SELF:
        return _written(tokenizer, writer, 0, n_windows, seqlen)
    chunks = _chunks(token_stream(tokenizer, source, "calib"), seqlen, bos_id(tokenizer))
    if len(chunks) < n_windows:
        raise DipSVDError(
            f"calibration text '{source}' is too short: it holds {len(chunks)} windows of {seqlen} tokens but "
            f"{n_windows} were requested; lower --calib-windows or --seqlen, or give more text")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(chunks), generator=g)[:n_windows]
    return chunks[pick.sort().values]


def heldout_windows(tokenizer, source: str, n_windows: int, seqlen: int, seed: int = 0,
                    skip: int = 0, writer=None) -> torch.Tensor:
    """Calibration-split windows NOT used for calibration (the `skip` windows the seed picked first); a mixed
    source's from each of its sources in its proportions."""
    if mix_shares(source) is not None:
        return _mixed(tokenizer, source, n_windows, seqlen, seed, skip, writer)
    if source == SELF:
        return _written(tokenizer, writer, skip, n_windows, seqlen)
    chunks = _chunks(token_stream(tokenizer, source, "calib"), seqlen, bos_id(tokenizer))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(chunks), generator=g)
    rest = order[skip: skip + n_windows]
    if len(rest) < n_windows:
        raise DipSVDError(f"not enough held-out text in '{source}' for {n_windows} windows of {seqlen} tokens")
    return chunks[rest.sort().values]


def evaluation_windows(tokenizer, source: str, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """The leading non-overlapping windows of the eval split, up to `max_tokens` tokens."""
    chunks = _chunks(token_stream(tokenizer, source, "eval"), seqlen, bos_id(tokenizer))
    if max_tokens:
        chunks = chunks[: max(1, max_tokens // seqlen)]
    if len(chunks) == 0:
        raise DipSVDError(f"evaluation text '{source}' is shorter than one window of {seqlen} tokens")
    return chunks
