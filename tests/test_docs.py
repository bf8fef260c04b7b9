"""README.md and docs/*.md hold together: links, anchors, cited paths.

Pure text checks (no TensorFlow), so they run in well under a second:

- every relative link or image (`[text](path#anchor)`, `![alt](path)`,
  `[text][ref]` with `[ref]: path`) outside code points at a file or folder of
  the repository, and every `#anchor` matches a heading of the target page
  under GitHub's slug rules (or an explicit `<a id=...>`);
- every repository path the pages name in text or code (`benchmarks/...`,
  `examples/...`, `keras_dks/...`, `tests/...`, `docs/...`, `.ci/...`) exists,
  and so does every `make` target and `keras_dks.<module>.<name>` they name;
- every page under docs/ is reachable from docs/index.md, and the README
  stays a front page (at most ~200 lines: reference belongs in docs/).
"""

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\[([^\]]*)\]")
REF_DEF = re.compile(r"^\s{0,3}\[([^\]]+)\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
REPO_PATH = re.compile(r"(?<![\w./-])((?:benchmarks|examples|keras_dks|tests|docs|\.ci)/[\w./<>*-]*)")


def pages():
    found = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(DOCS, "*.md")))
    assert len(found) > 1, f"no docs pages found under {DOCS}"
    return found


def _split(text):
    """(prose lines, code lines) of a Markdown page; fenced blocks are code."""
    prose, code, in_fence = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        (code if in_fence else prose).append(line)
    return prose, code


def _strip_code_spans(line):
    return re.sub(r"(`+)(.+?)\1", " ", line)


def github_slug(heading):
    """GitHub's anchor for a heading's text: the rendered text, lower-cased,
    everything but letters, digits, `_`, `-` and spaces removed, spaces -> `-`."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor a page defines: heading slugs (with GitHub's -1, -2 suffixes
    for repeats) and explicit HTML anchors."""
    prose, _ = _split(open(path, encoding="utf-8").read())
    seen, found = {}, set()
    for line in prose:
        found.update(HTML_ANCHOR.findall(line))
        m = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path):
    """Every link target written in a page's prose (not in code)."""
    prose, _ = _split(open(path, encoding="utf-8").read())
    defs = {}
    for line in prose:
        m = REF_DEF.match(line)
        if m:
            defs[m.group(1).lower()] = m.group(2)
    targets = []
    for line in prose:
        if REF_DEF.match(line):
            targets.append(REF_DEF.match(line).group(2))
            continue
        line = _strip_code_spans(line)
        targets += INLINE_LINK.findall(line)
        for text, ref in REF_LINK.findall(line):
            key = (ref or text).lower()
            if key not in defs:
                targets.append(f"<undefined reference [{ref or text}]>")
    return targets


def broken_links(path):
    broken = []
    here = os.path.dirname(path)
    for target in links(path):
        if target.startswith("<undefined"):
            broken.append(target)
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(here, file_part)) if file_part else path
        if not os.path.exists(dest):
            broken.append(f"{target}: no such file {os.path.relpath(dest, REPO)}")
            continue
        if not os.path.realpath(dest).startswith(REPO + os.sep):
            broken.append(f"{target}: points outside the repository")
            continue
        if anchor:
            if not dest.endswith(".md"):
                broken.append(f"{target}: an anchor into a file that is not a Markdown page")
            elif anchor not in anchors(dest):
                broken.append(f"{target}: no heading with the anchor #{anchor} in "
                              f"{os.path.relpath(dest, REPO)}")
    return broken


def test_every_relative_link_and_anchor_resolves():
    broken = {}
    for path in pages():
        problems = broken_links(path)
        if problems:
            broken[os.path.relpath(path, REPO)] = problems
    assert not broken, (
        f"broken links (fix the target, or the heading it points at): {broken}")


def test_every_repository_path_named_in_the_pages_exists():
    missing = {}
    for path in pages():
        prose, code = _split(open(path, encoding="utf-8").read())
        names = set()
        for line in prose + code:
            for name in REPO_PATH.findall(line):
                if "<" in name or ">" in name or "*" in name:
                    continue  # a pattern such as tests/test_<module>.py
                names.add(name.rstrip(".,;:"))
        gone = sorted(n for n in names if not os.path.exists(os.path.join(REPO, n)))
        if gone:
            missing[os.path.relpath(path, REPO)] = gone
    assert not missing, f"the docs name paths that do not exist: {missing}"


def test_every_keras_dks_name_in_the_pages_exists():
    # `keras_dks.losses.check_labels`, `keras_dks.export.OPENVINO_FLOAT32`, ...:
    # the longest importable module prefix, then attributes.
    import importlib
    import warnings

    names = set()
    for path in pages():
        names |= set(re.findall(r"\bkeras_dks(?:\.[A-Za-z_]\w*)+", open(path, encoding="utf-8").read()))
    assert len(names) > 10, names  # the pages do name the API
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # deprecated names still resolve
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
        except AttributeError:
            missing.append(name)
    assert not missing, f"the docs name keras_dks members that do not exist: {missing}"


def test_every_make_target_named_in_the_pages_exists():
    makefile = open(os.path.join(REPO, "Makefile"), encoding="utf-8").read()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, re.MULTILINE))
    missing = {}
    for path in pages():
        named = set(re.findall(r"`make ([\w.-]+)|^\s*make ([\w.-]+)",
                               open(path, encoding="utf-8").read(), re.MULTILINE))
        gone = sorted({a or b for a, b in named} - targets)
        if gone:
            missing[os.path.relpath(path, REPO)] = gone
    assert not missing, f"the docs name make targets the Makefile lacks: {missing}"


def test_every_docs_page_is_linked_from_the_index():
    index = os.path.join(DOCS, "index.md")
    linked = {os.path.normpath(os.path.join(DOCS, t.partition("#")[0]))
              for t in links(index) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)}
    orphans = sorted(os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "*.md"))
                     if p != index and os.path.normpath(p) not in linked)
    assert not orphans, f"docs pages missing from docs/index.md: {orphans}"


def test_readme_stays_a_front_page():
    lines = open(os.path.join(REPO, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move reference "
        "text to a page under docs/ and link it")
    # The newcomer's two commands come first.
    setup = next(i for i, line in enumerate(lines) if line.startswith("## "))
    block = "\n".join(lines[setup:setup + 8])
    assert "make demo" in block and "make test" in block, (
        "the first section of README.md must give the two set-up commands, make demo and make test")


def test_github_slug_rules():
    # Known anchors GitHub generates for such headings.
    assert github_slug("Deploy: SavedModel, LiteRT, ONNX, OpenVINO") == \
        "deploy-savedmodel-litert-onnx-openvino"
    assert github_slug('`taps="auto"`') == "tapsauto"
    assert github_slug("The family of methods (`keras_dks.methods`)") == \
        "the-family-of-methods-keras_dksmethods"
    assert github_slug("When is DKS worth it? Training-set size") == \
        "when-is-dks-worth-it-training-set-size"
    assert github_slug("What `fit` logs") == "what-fit-logs"
    assert github_slug("[Linked](x.md) heading") == "linked-heading"
