"""docs/architecture.md's pieces table names every module and BPF source
that exists, and nothing that does not."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def table() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    return text[text.index("## Pieces"):].split("\n## ", 1)[0]


def named() -> set[str]:
    return {name for cell in re.findall(r"`([^`]+)`", table()) for name in [Path(cell).name] if "." in name}


def test_every_module_and_bpf_source_is_in_the_pieces_table():
    files = [p for p in (ROOT / "src" / "kmesh").rglob("*.py") if p.name != "__init__.py"]
    files += [*(ROOT / "bpf").glob("*.bpf.c"), *(ROOT / "bpf" / "include").glob("*.h")]
    files += [*(ROOT / "src" / "native").glob("*.[ch]")]
    missing = sorted(str(p.relative_to(ROOT)) for p in files if p.name not in named())
    assert not missing, missing


def test_the_table_names_no_file_that_is_gone():
    exists = {p.name for p in [*ROOT.glob("src/kmesh/**/*.py"), *ROOT.glob("bpf/**/*"), *ROOT.glob("tests/**/*.py"),
                               *ROOT.glob("src/native/*"), *ROOT.glob("*/*.sh"), *ROOT.glob("*/*/*.sh"), *ROOT.glob("*.sh")]}
    gone = sorted(n for n in named() if n.endswith((".py", ".h", ".c", ".sh")) and n not in exists)
    assert not gone, gone
