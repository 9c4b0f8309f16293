#!/usr/bin/env bash
# Points every citation of the two contract documents that used to live outside the repository
# at their copies in docs/ (issue 9):
#
#   thingsboard-coap-api.md  ->  docs/thingsboard-coap.md
#   interface.md             ->  docs/interface.md
#
# in any of the forms the tree uses: bare (`interface.md §x`), `shared/docs/…`, `../shared/docs/…`,
# `/work/shared/docs/…`, and markdown link targets (`[text](../shared/docs/interface.md#cli)`),
# which get a path relative to the file that holds the link. Also replaces the one pointer to the
# starting design outside the repository in docs/architecture.md.
#
# Idempotent: a citation that already reads docs/… is left alone, and words that merely end in
# the same name (`dbus-interface.md`, `my_interface.md`) are not touched. C and C++ files it
# changes are run through clang-format, since a longer path can push a comment past the column
# limit (skip with --no-format).
#
# Usage: scripts/fix-doc-citations.sh [-n|--dry-run] [--no-format]
#   --dry-run   list every line it would change (file:line, old and new), change nothing;
#               exits 0 when there is nothing to do, 1 when something would change.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
format=1
for arg in "$@"; do
  case "$arg" in
    -n | --dry-run) dry_run=1 ;;
    --no-format) format=0 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "fix-doc-citations: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

# Tracked and untracked-but-not-ignored files under the directories that may cite the docs.
# The script itself and the test that guards the citations are not rewritten.
mapfile -t files < <(git ls-files --cached --others --exclude-standard -- \
  src tests docs README.md bench systemd config scripts |
  grep -v -e '^scripts/fix-doc-citations\.sh$' -e '^tests/integration/test_docs\.py$' |
  sort -u)

changed_list=$(mktemp)
trap 'rm -f "$changed_list"' EXIT
DRY_RUN=$dry_run CHANGED_LIST=$changed_list python3 - "${files[@]}" <<'PY'
import os
import re
import sys

dry_run = os.environ["DRY_RUN"] == "1"
root = os.getcwd()

TARGETS = {
    "thingsboard-coap-api.md": "docs/thingsboard-coap.md",
    "interface.md": "docs/interface.md",
}

# A citation: an optional prefix that points outside the repository (or already at docs/),
# then one of the two names. It must not continue a longer word or path on the left (so
# "dbus-interface.md" and "include/interface.md" stay), nor go on with a word character on the
# right ("interface.mdx"). An anchor (#…) or a " §x" after it is kept as it is.
CITATION = re.compile(
    r"(?<![\w./-])"
    r"(?P<prefix>(?:/work/)?(?:\.\./)*(?:shared/)?(?:docs/)?)"
    r"(?P<name>thingsboard-coap-api\.md|interface\.md)"
    r"(?![\w-])"
)

# docs/architecture.md opened with a pointer to the starting design, which is not in the
# repository; the page itself is the design as built.
ARCHITECTURE_OLD = ("The starting design is `../shared/docs/architecture.md`; this page says what "
                    "the code does today.")
ARCHITECTURE_NEW = "This page says how tb-agent is built today."


def replacement(match, path, line):
    target = TARGETS[match.group("name")]
    start = match.start()
    if line[:start].endswith("]("):
        # A markdown link target resolves relative to the file that holds it.
        return os.path.relpath(os.path.join(root, target), os.path.dirname(os.path.join(root, path)))
    return target


def rewrite_line(path, line):
    line = CITATION.sub(lambda m: replacement(m, path, line), line)
    if path == "docs/architecture.md":
        line = line.replace(ARCHITECTURE_OLD, ARCHITECTURE_NEW)
    return line


changed = []
for path in sys.argv[1:]:
    if not os.path.isfile(path):
        continue
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        continue  # binary data
    lines = text.splitlines(keepends=True)
    new_lines = [rewrite_line(path, line) for line in lines]
    if new_lines == lines:
        continue
    changed.append(path)
    for number, (old, new) in enumerate(zip(lines, new_lines), 1):
        if old != new:
            print(f"{path}:{number}:\n  - {old.rstrip()}\n  + {new.rstrip()}")
    if not dry_run:
        with open(path + ".fix-doc-citations.tmp", "w", encoding="utf-8") as f:
            f.write("".join(new_lines))
        os.chmod(path + ".fix-doc-citations.tmp", os.stat(path).st_mode & 0o7777)
        os.replace(path + ".fix-doc-citations.tmp", path)

with open(os.environ["CHANGED_LIST"], "w", encoding="utf-8") as f:
    f.write("".join(p + "\n" for p in changed))
PY
changed=$(cat "$changed_list")

if [[ -z "$changed" ]]; then
  echo "fix-doc-citations: nothing to change" >&2
  exit 0
fi
count=$(wc -l <<<"$changed")
if ((dry_run)); then
  echo "fix-doc-citations: would change $count file(s) (dry run, nothing written)" >&2
  exit 1
fi
if ((format)); then
  mapfile -t cxx < <(grep -E '\.(c|h|cpp|hpp)$' <<<"$changed" || true)
  if ((${#cxx[@]})); then
    if command -v clang-format >/dev/null; then
      clang-format -i "${cxx[@]}"
    else
      echo "fix-doc-citations: clang-format not found; run it on: ${cxx[*]}" >&2
    fi
  fi
fi
echo "fix-doc-citations: changed $count file(s)" >&2
