"""The checkpoint layer depends downward only: nothing in megatron_apriel/checkpoint/ imports the
training loop (or anything above it), and the family drivers do not import the converter that
drives them. Read from the source (AST), so imports inside functions count too."""

import ast
from pathlib import Path

from conftest import REPO

CHECKPOINT = REPO / "megatron_apriel" / "checkpoint"
ABOVE_CHECKPOINT = ("training", "rl", "eval", "demo", "cli", "train", "generate")


def imported_modules(path: Path, package: str = "megatron_apriel.checkpoint") -> set[str]:
    """Every module ``path`` imports, relative imports resolved against ``package``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            out |= {module} | {f"{module}.{a.name}" for a in node.names}
    return out


def test_checkpoint_imports_nothing_above_it():
    files = sorted(CHECKPOINT.glob("*.py"))
    assert len(files) >= 8, files
    upward = {f"{f.name}: {m}" for f in files for m in imported_modules(f)
              if any(m == f"megatron_apriel.{top}" or m.startswith(f"megatron_apriel.{top}.")
                     for top in ABOVE_CHECKPOINT)}
    assert not upward, sorted(upward)


def test_family_drivers_do_not_import_the_converter():
    for name in ("mistral.py", "llava.py", "table.py", "dcp_io.py"):
        imports = imported_modules(CHECKPOINT / name)
        assert not {m for m in imports if m.startswith("megatron_apriel.checkpoint.convert")}, name
        assert "megatron_apriel.checkpoint.convert" not in {m.rsplit(".", 1)[0] for m in imports}, name


def test_the_reader_sees_relative_and_deferred_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..training import loop\n    import megatron_apriel.rl.grpo\n")
    assert ({"megatron_apriel.training", "megatron_apriel.training.loop", "megatron_apriel.rl.grpo"}
            <= imported_modules(probe))
    # the converter as it was before the checkpoint layer stood on its own
    old = tmp_path / "convert.py"
    old.write_text("def reader():\n    from megatron_apriel.training.checkpointing import resolve_load_dir\n")
    assert "megatron_apriel.training.checkpointing" in imported_modules(old)


def test_family_drivers_offer_what_the_conversion_loop_asks():
    """Each family module has every name convert.py calls on it (a family added later must too)."""
    from megatron_apriel.checkpoint import convert, llava, mistral

    asked = ("NAME", "LABEL", "LAYOUT", "preset_from_hf_config", "export_config", "table", "hf_canonical",
             "build_chunks", "load_canonical")
    for name in asked:
        assert f"``{name}``" in convert.__doc__, name
    for family in (mistral, llava):
        assert [n for n in asked if not hasattr(family, n)] == [], family.__name__
