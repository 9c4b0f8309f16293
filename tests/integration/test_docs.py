# ctest-labels: unit docs
"""The documentation holds together (issue 9).

* Every `*.md` path cited in src/, tests/, docs/, bench/, systemd/, config/, scripts/ and the
  README names a file in the repository (resolved from the repository root, from docs/, or from
  the citing file's directory), so nobody who picks the code up meets a reference to a document
  they cannot open.
* The configuration reference exists once per audience and they agree: every key documented in
  docs/configuration.md has an entry in the man page docs/man/tb-agent.yaml.5 and the other way
  round, and every key the loader's tables in src/config/config.cpp accept is documented.
* Each source type's keys, as its declaration table in src/sources/ declares them (issue 10), are
  the keys its table in docs/configuration.md and its entries in the man page list, no more and
  no fewer, and docs/sources.md has a section for every type.

Pure file checks: no build needed.
"""
import os
import re
import subprocess
from pathlib import Path

import pytest

import declarations

ROOT = Path(os.environ.get("TB_SOURCE_DIR", Path(__file__).resolve().parents[2]))
SCANNED = ["src", "tests", "docs", "bench", "systemd", "config", "scripts", "README.md"]

# A document reference: a path ending in .md that does not continue a longer path on the left
# (so "${PROJECT_SOURCE_DIR}/docs/dbus.md" in CMake is not one). Installed paths such as
# /usr/share/doc/tb-agent/configuration.md are not checked; any other absolute path is, and fails.
DOC_REFERENCE = re.compile(r"(?<![\w.@}/$-])(/?[\w.-][\w./-]*\.md)(?![\w-])")
INSTALLED = ("/usr/", "/etc/", "/var/", "/opt/", "/run/")

# The migration script and this test name the old, outside documents on purpose.
NOT_SCANNED = {"scripts/fix-doc-citations.sh", "tests/integration/test_docs.py"}

# Files of other repositories that docs/thingsboard-coap.md names as its sources.
EXTERNAL = {
    "docs/thingsboard-coap.md": {
        "_includes/docs/reference/coap-api.md",
        "_includes/docs/user-guide/device-provisioning.md",
        "_includes/templates/provisioning/coap-*.md",
        "_includes/docs/user-guide/ota-updates.md",
        "_includes/docs/user-guide/ssl/coap-*.md",
    },
}


def candidate_names():
    """The repository's files under SCANNED: git's list (tracked and not ignored), or, outside a
    git checkout (a release tarball), every file but build trees and hidden directories."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                              "--", *SCANNED], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout
        return set(out.splitlines())
    except (OSError, subprocess.CalledProcessError):
        names = set()
        for top in SCANNED:
            if (ROOT / top).is_file():
                names.add(top)
            for folder, dirs, files in os.walk(ROOT / top):
                dirs[:] = [d for d in dirs if not d.startswith((".", "build", "__pycache__"))]
                names |= {str((Path(folder) / f).relative_to(ROOT)) for f in files}
        return names


def scanned_files():
    for name in sorted(candidate_names() - NOT_SCANNED):
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the work tree
        try:
            yield name, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary


def resolves(reference, citing):
    reference = reference.split("#", 1)[0]
    candidates = [ROOT / reference, ROOT / "docs" / reference, (ROOT / citing).parent / reference]
    return any(c.is_file() for c in candidates)


def test_every_cited_document_is_in_the_repository():
    broken = []
    for name, text in scanned_files():
        for number, line in enumerate(text.splitlines(), 1):
            for match in DOC_REFERENCE.finditer(line):
                reference = match.group(1)
                if reference.startswith(INSTALLED) or reference in EXTERNAL.get(name, ()):
                    continue
                if not resolves(reference, name):
                    broken.append(f"{name}:{number}: {reference}")
    assert not broken, ("cited documents that are not in the repository "
                        "(scripts/fix-doc-citations.sh fixes the known ones):\n  "
                        + "\n  ".join(broken))


def test_the_reference_check_sees_what_it_must():
    # The pattern catches the forms the tree uses, and leaves installed paths alone.
    def refs(line):
        return [m.group(1) for m in DOC_REFERENCE.finditer(line)]

    assert refs("// (thingsboard-coap-api.md §8)") == ["thingsboard-coap-api.md"]
    assert refs("see `../shared/docs/interface.md`, [x](docs/coap.md#limits)") == [
        "../shared/docs/interface.md", "docs/coap.md"]
    assert refs("install(FILES ${PROJECT_SOURCE_DIR}/docs/dbus.md") == []
    assert refs(".IR /usr/share/doc/tb-agent/configuration.md .") == [
        "/usr/share/doc/tb-agent/configuration.md"]
    assert refs("cited from /work/shared/docs/interface.md") == ["/work/shared/docs/interface.md"]
    assert not "/work/shared/docs/interface.md".startswith(INSTALLED)
    assert not resolves("no-such-document.md", "src/daemon/cli.hpp")
    assert resolves("coap.md", "src/coap/client.hpp")  # docs/coap.md
    assert resolves("docs/configuration.md#server", "README.md")


# --- configuration reference: docs/configuration.md <-> docs/man/tb-agent.yaml.5 <-> config.cpp

def qualified(section, key):
    """The full name of a key: server.host, state_dir, sources[].path."""
    if section == key:
        return key  # a top-level scalar such as state_dir
    if section == "sources":
        return f"sources[].{key}"
    return f"{section}.{key}"


def keys_in_configuration_md():
    """Keys of the tables under the '## `section`' headings (a '### `type: x`' heading stays in
    its section). Only tables whose first column is headed 'key' count."""
    keys = set()
    section = None
    in_key_table = False
    for line in (ROOT / "docs/configuration.md").read_text(encoding="utf-8").splitlines():
        # "## `server`", and a nested section "### `server.dtls`".
        heading = re.match(r"^###? `([\w.]+)`\s*$", line)
        if heading:
            section = heading.group(1)
        elif line.startswith("## "):
            section = None
        if not line.startswith("|"):
            in_key_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "key":
            in_key_table = True
            continue
        key = re.fullmatch(r"`(\w+)`", cells[0])
        if in_key_table and section and key:
            keys.add(qualified(section, key.group(1)))
    return keys


def keys_in_man_page():
    """The first word of the line after each .TP in the KEYS part of tb-agent.yaml.5 (from the
    first .SH after GENERAL RULES to EXAMPLE)."""
    keys = set()
    lines = (ROOT / "docs/man/tb-agent.yaml.5").read_text(encoding="utf-8").splitlines()
    in_keys = False
    for i, line in enumerate(lines):
        if line.startswith(".SH"):
            title = line[3:].strip().strip('"')
            in_keys = title not in ("NAME", "SYNOPSIS", "DESCRIPTION", "GENERAL RULES",
                                    "EXAMPLE", "FILES", "SEE ALSO")
        if in_keys and line == ".TP" and i + 1 < len(lines):
            tag = re.match(r'^\.(?:B|BR|BI|I|IR)\s+"?([^\s"]+)', lines[i + 1])
            assert tag, f"tb-agent.yaml.5:{i + 2}: a .TP entry must start with .B key.name"
            keys.add(tag.group(1).replace("\\&", ""))
    return keys


def keys_in_loader():
    """Keys of the tables in src/config/config.cpp: `const Table<...> kName = { {"key", ...`,
    named by the top-level table's `section(&Config::name, kName)`."""
    text = (ROOT / "src/config/config.cpp").read_text(encoding="utf-8")
    tables = {}
    for match in re.finditer(r"const Table<\w+> (k\w+) = \{(.*?)\n\};", text, re.S):
        tables[match.group(1)] = re.findall(
            r'^\s*\{"(\w+)",\s*(?:Required|Optional),\s*(?:section\(&\w+::\w+,\s*(k\w+))?',
            match.group(2), re.M)

    def expand(prefix, table):
        """A section's keys, nested sections (server.dtls) included."""
        out = set()
        for key, nested in tables[table]:
            out |= expand(f"{prefix}.{key}", nested) if nested else {f"{prefix}.{key}"}
        return out

    assert "kTop" in tables, "config.cpp no longer has its kTop table; update this test"
    top_body = re.search(r"const Table<Config> kTop = \{(.*?)\n\};", text, re.S).group(1)
    keys = set()
    for entry in re.finditer(r'\{"(\w+)",\s*(?:Required|Optional),\s*(.*?)\},?\s*$', top_body,
                             re.M | re.S):
        name, handler = entry.group(1), entry.group(2)
        table = re.search(r"section\(&Config::\w+,\s*(k\w+)", handler)
        if table:
            keys |= expand(name, table.group(1))
        elif name == "sources":
            keys |= {qualified("sources", k.name) for k in declarations.common_keys()}
            for type_name in declarations.types():
                keys |= {qualified("sources", k.name) for k in declarations.keys_of(type_name)}
        else:
            keys.add(name)
    return keys


def test_configuration_md_and_the_man_page_list_the_same_keys():
    documented = keys_in_configuration_md()
    in_man = keys_in_man_page()
    assert len(documented) > 20, f"parsed too few keys from configuration.md: {documented}"
    assert documented - in_man == set(), "keys missing from docs/man/tb-agent.yaml.5"
    assert in_man - documented == set(), "keys in tb-agent.yaml.5 but not in configuration.md"


def test_every_key_the_loader_accepts_is_documented():
    accepted = keys_in_loader()
    assert {"server.host", "state_dir", "sources[].path", "logging.level"} <= accepted, accepted
    assert accepted - keys_in_configuration_md() == set(), "keys missing from configuration.md"


def test_the_man_pages_render_without_warnings():
    if subprocess.run(["sh", "-c", "command -v groff"], capture_output=True).returncode != 0:
        pytest.skip("groff is not installed (Debian: groff-base)")
    for page in ["docs/man/tb-agent.yaml.5", "docs/man/tb-agent.8"]:
        for width in ("65n", "78n", "100n"):
            run = subprocess.run(["groff", "-man", "-Tutf8", "-ww", f"-rLL={width}", page],
                                 cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "LC_ALL": "C.UTF-8"})
            assert run.returncode == 0 and run.stderr == "", f"{page} at {width}: {run.stderr}"
            assert "tb-agent" in run.stdout


# --- source types: their declaration tables (src/sources/) <-> the docs' per-type key lists ---

def source_keys_in_configuration_md():
    """{"": keys of every source, type: its own keys} from the '## `sources`' table and the
    '### `type: x`' tables of docs/configuration.md."""
    tables = {}
    current = None
    in_sources = False
    for line in (ROOT / "docs/configuration.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            in_sources = line.strip() == "## `sources`"
            current = "" if in_sources else None
            continue
        heading = re.match(r"^### `type: (\w+)`\s*$", line)
        if in_sources and heading:
            current = heading.group(1)
            continue
        if in_sources and line.startswith("### "):
            current = None
        if current is None or not line.startswith("|"):
            continue
        key = re.fullmatch(r"`(\w+)`", line.strip().strip("|").split("|")[0].strip())
        if key:
            tables.setdefault(current, []).append(key.group(1))
    return tables


def source_keys_in_man_page():
    """{"": keys of every source, type: keys whose entry names it} from the SOURCES part of
    tb-agent.yaml.5: an entry `.BR sources[].key " (…; file and plugin sources)"` belongs to the
    types it names; one without such a note, to every source."""
    lines = (ROOT / "docs/man/tb-agent.yaml.5").read_text(encoding="utf-8").splitlines()
    out = {}
    in_sources = False
    for i, line in enumerate(lines):
        if line.startswith(".SH"):
            in_sources = line[3:].strip().strip('"') == "SOURCES"
        if not (in_sources and line == ".TP" and i + 1 < len(lines)):
            continue
        entry = re.match(r'^\.BR? sources\[\]\.(\w+)(?: "(.*)")?', lines[i + 1])
        assert entry, f"tb-agent.yaml.5:{i + 2}: expected a sources[].key entry"
        note = re.search(r";\s*([\w ,]+?) sources\)", entry.group(2) or "")
        owners = re.split(r",\s*|\s+and\s+", note.group(1)) if note else [""]
        for owner in owners:
            out.setdefault(owner, []).append(entry.group(1))
    return out


def test_each_source_types_documented_keys_are_its_declared_keys():
    types = declarations.types()
    assert set(types) == {"file", "exec", "system", "execd", "plugin"}, types
    common = [k.name for k in declarations.common_keys()]
    md = source_keys_in_configuration_md()
    man = source_keys_in_man_page()
    assert sorted(md.get("", [])) == sorted(common), "configuration.md: keys of every source"
    assert sorted(man.get("", [])) == sorted(common), "tb-agent.yaml.5: keys of every source"
    for name, (periodic, own) in types.items():
        declared = sorted(k.name for k in own)
        assert sorted(md.get(name, [])) == declared, f"configuration.md, type: {name}"
        assert sorted(man.get(name, [])) == declared, f"tb-agent.yaml.5, type: {name}"
    assert set(md) - {""} == set(types), "configuration.md documents a type that does not exist"
    assert set(man) - {""} == set(types), "tb-agent.yaml.5 documents a type that does not exist"


def test_a_type_without_an_interval_is_named_where_interval_is_documented():
    push = [name for name, (periodic, _) in declarations.types().items() if not periodic]
    assert push == ["execd"], push
    md = (ROOT / "docs/configuration.md").read_text(encoding="utf-8")
    row = next(line for line in md.splitlines() if line.startswith("| `interval` |"))
    man = (ROOT / "docs/man/tb-agent.yaml.5").read_text(encoding="utf-8")
    entry = man[man.index(".BR sources[].interval"):][:300]
    for name in push:
        assert f"`{name}`" in row, row
        assert name in entry, entry


def test_sources_md_has_a_section_for_every_type():
    text = (ROOT / "docs/sources.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## `?type: (\w+)`?\s*$", text, re.M))
    assert sections == set(declarations.types()), sections


def test_the_declarations_parser_sees_what_it_must():
    file_keys = [k.name for k in declarations.types()["file"][1]]
    assert file_keys == ["path", "key", "scale", "offset"], file_keys
    assert [k.name for k in declarations.keys_of("execd")] == [
        "name", "type", "command", "timeout", "env", "working_directory"]
    interval = next(k for k in declarations.common_keys() if k.name == "interval")
    assert not interval.required and interval.default == "30s"
