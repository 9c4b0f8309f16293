"""The source types' declaration tables, read from src/sources/ (stdlib only, no build needed).

Each type declares its keys in one table, `const config::Keys<S> kName = { {"key", Need::…,
"type", "default", reader, "description"}, … };`, and itself with
`declare("name", Collection::Periodic|Push, kName, …)`; the keys every source has are
registry.cpp's kCommonKeys (name, type, and interval for periodic types). Tests use this to
check the docs and reloads against what the code declares, so a new key or type cannot be
forgotten there."""
import os
import re
from pathlib import Path

ROOT = Path(os.environ.get("TB_SOURCE_DIR", Path(__file__).resolve().parents[2]))

TABLE = re.compile(r"const config::Keys<[\w:]+> (k\w+) = \{(.*?)\n\};", re.S)
ROW = re.compile(r'\{"(\w+)",\s*Need::(Required|Optional),\s*"([^"]*)",\s*"([^"]*)"')
DECLARE = re.compile(r'declare(?:<\w+>)?\(\s*"(\w+)",\s*Collection::(Periodic|Push),\s*(k\w+)')


class Key:
    def __init__(self, name, required, type_, default):
        self.name, self.required, self.type, self.default = name, required, type_, default

    def __repr__(self):
        return f"Key({self.name})"


def _sources_text():
    return {p.name: p.read_text(encoding="utf-8")
            for p in sorted((ROOT / "src" / "sources").glob("*.cpp"))}


def tables():
    """Every declaration table by its C++ name: a list of Key in declaration order."""
    found = {}
    for text in _sources_text().values():
        for name, body in TABLE.findall(text):
            found[name] = [Key(k, need == "Required", t, d) for k, need, t, d in ROW.findall(body)]
    return found


def common_keys():
    return tables()["kCommonKeys"]


def types():
    """{type name: (periodic, [Key of its own table])}, in no particular order."""
    all_tables = tables()
    out = {}
    for text in _sources_text().values():
        for name, collection, table in DECLARE.findall(text):
            out[name] = (collection == "Periodic", all_tables[table])
    return out


def keys_of(type_name):
    """The keys a source of this type has: the common ones that apply, then its own."""
    periodic, own = types()[type_name]
    common = [k for k in common_keys() if k.name != "interval" or periodic]
    return common + own
