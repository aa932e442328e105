"""The shape of the package: imports flow one way, no module is over 400 lines, and nothing outside
`lorabake/arch/` names a model family (it asks the registry)."""

from __future__ import annotations

import ast
import io
import os
import tokenize

import pytest

from lorabake.arch import FAMILIES

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lorabake")

# Layers, lowest first. A module may import from its own layer or a lower one, never from a higher one.
# (Written down once here; README "Development" points at it.)
LAYERS: list[tuple[str, ...]] = [
    # 0: value types, errors, dtypes, devices: no lorabake imports beyond this layer
    ("types", "errors", "dtypes", "devices", "file_copy", "bufpool", "readahead"),
    # 1: the safetensors format, and the format knowledge as data (families, adapter grammar)
    ("st_entry", "st_scan", "st_header", "st_reader", "st_writer", "arch", "adapters"),
    # 2: reading names and descriptions: checkpoint detection, LoRA grammar, recipes and jobs; math on tensors
    (
        "detect", "lora_format", "delta", "rounding", "svd", "lowrank", "module_factors", "fold", "bake_kernel", "pipeline",
        "jobs", "recipe", "shards", "provenance", "lora_data", "spread", "block_spec",
        "quant",  # stored formats: codecs (math on tensors over rounding) and the GGUF reader/writer
    ),
    # 3: the rule table
    ("keymap",),
    # 4: what a LoRA is for (matching against rule tables), and the plan
    ("lora_base", "blocks", "plan", "extract_full", "extract_plan", "convert_plan"),
    # 5: use cases: where files meet math
    ("ops", "bake_windows", "extract", "inspection", "explain", "batch", "fanout", "loratools", "loratools_out", "base_delta", "convert",
     "convert_write", "block_energy"),
    # 6: presentation
    ("progress", "render", "batch_render", "lora_args", "cli_loratools", "cli", "__main__"),
]


def _layer_of(module: str) -> int | None:
    """Layer of `lorabake.<module>` (first path part decides: `arch.sd1` is `arch`)."""
    head = module.split(".")[0]
    for index, names in enumerate(LAYERS):
        if head in names:
            return index
    return None


def _modules() -> list[tuple[str, str]]:
    out = []
    for root, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, PKG)[: -len(".py")].replace(os.sep, ".")
                out.append((rel.removesuffix(".__init__"), path))
    return sorted(out)


def _imports(path: str) -> list[str]:
    """lorabake modules `path` imports (`from lorabake import x` counts as `x`)."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name[len("lorabake.") :] for a in node.names if a.name.startswith("lorabake.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lorabake":
                found += [a.name for a in node.names]
            elif node.module.startswith("lorabake."):
                found.append(node.module[len("lorabake.") :])
    return found


def test_the_layers_name_real_modules():
    # a module not listed here is not checked (a new module should be added to LAYERS); a listed name
    # that is no module is a typo
    heads = {m.split(".")[0] for m, _ in _modules()}
    listed = {name for layer in LAYERS for name in layer}
    known_later = {"adapters", "quant", "kernel"}  # packages other work adds
    assert listed - heads <= known_later, listed - heads


def test_imports_flow_one_way():
    upward = []
    for module, path in _modules():
        own = _layer_of(module)
        if own is None:
            continue
        for imported in _imports(path):
            if imported == "__version__":
                continue
            layer = _layer_of(imported)
            if layer is not None and layer > own:
                upward.append(f"{module} (layer {own}) imports {imported} (layer {layer})")
    assert not upward, "\n".join(upward)


# Being split by the adapters work (one module per adapter type); remove a row when its split lands.
BEING_SPLIT = {"delta", "lora_format"}


def test_no_module_over_400_lines():
    long = {}
    for module, path in _modules():
        with open(path, encoding="utf-8") as fh:
            lines = sum(1 for _ in fh)
        if lines > 400:
            long[module] = lines
    assert set(long) <= BEING_SPLIT, long


def _family_words() -> set[str]:
    words = set()
    for f in FAMILIES.values():
        words.update({f.arch, f.modelspec, f.kohya, *f.metadata_names})
    return {w.lower() for w in words}


def test_nothing_outside_arch_names_a_family():
    words = _family_words()
    found = []
    for module, path in _modules():
        if module.split(".")[0] == "arch":
            continue
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.STRING:
                continue
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, str) and value.strip().lower() in words:
                found.append(f"{module}:{tok.start[0]}: {tok.string}")
    assert not found, "family names outside lorabake/arch (ask the registry instead):\n" + "\n".join(found)


@pytest.mark.parametrize("word", ["sd1", "flux"])
def test_the_family_name_check_can_fail(tmp_path, word):
    # the check above reads string literals: a module comparing an id by name is caught
    source = f'if arch == "{word}":\n    pass\n'
    values = [ast.literal_eval(t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type == tokenize.STRING]
    assert word in _family_words() and values == [word]
