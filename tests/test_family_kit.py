"""The family kit: every registered family, in every variant of ``tests/family_kit.py``, through the whole tool.

For each variant: Hugging Face -> Megatron (TP2 PP2, Transformer Engine and local naming, legacy where
the family allows it, else its refusal; EP2 PP2 and TP2 x EP2 for mixture-of-experts) -> Hugging Face logits
and config; Megatron reshapes (for experts also to EP2, and to TEGroupedMLP at EP4); torch_dist round trips;
megatron-core's own logits of our rank files (TP2 PP2 local, TP1 Transformer Engine, EP2 PP2, TP2 x EP2) and
of our torch_dist (loaded at TP2), and for experts the miss when the rank files lose a routing feature; a
torch_dist that megatron-core saved from the args we write, converted to Hugging Face; ``inspect --check``
and ``verify``. Converted trees are made once per module and shared; megatron-core runs every job of
every variant in one set of four processes.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_convert.model.family import registered
from checkpoint_convert.formats.megatron_args import plain_fields
from checkpoint_convert.commands.report_cli import run_inspect_cli, run_verify_cli
from tests.family_kit import TOWER_VARIANTS, VARIANTS, TowerVariant, Variant
from tests.helpers import TOKENS, assert_logits_close, convert, logits_of

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -r requirements-dev.txt)")

ORACLE = Path(__file__).with_name("megatron_oracle.py")
MEGATRON_CORE_ATOL = 2e-5
TP2_PP2 = ["--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2"]
TP2_EP2 = ["--target_tensor_model_parallel_size", "2", "--target_expert_model_parallel_size", "2"]
# name -> (source tree, or None for the Hugging Face model; flags)
TREES = {
    "te_tp2pp2": (None, TP2_PP2),
    "local_tp2pp2": (None, [*TP2_PP2, "--transformer_impl", "local"]),
    "legacy_tp2pp2": (None, [*TP2_PP2, "--megatron_format", "legacy"]),
    "local_ep2pp2": (None, ["--target_expert_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2",
                            "--transformer_impl", "local"]),
    "local_tp2ep2": (None, [*TP2_EP2, "--transformer_impl", "local"]),
    "te_tp1": (None, []),
    "dist": (None, ["--megatron_ckpt_format", "torch_dist", "--target_tensor_model_parallel_size", "2",
                    "--transformer_impl", "local"]),  # megatron-core's local spec loads it
    "reshaped": ("te_tp2pp2", ["--target_tensor_model_parallel_size", "1", "--target_pipeline_layers", "1,3",
                               "--transformer_impl", "local"]),
    "reshaped_ep2": ("te_tp2pp2", ["--target_tensor_model_parallel_size", "1", "--target_expert_model_parallel_size",
                                   "2", "--target_pipeline_layers", "3,1"]),
    "dist_from_ranks": ("te_tp2pp2", ["--megatron_ckpt_format", "torch_dist"]),
    # TP2 x EP2 SequentialMLP -> TP1 EP4 TEGroupedMLP (Transformer Engine naming)
    "grouped_ep4": ("local_tp2ep2", ["--target_tensor_model_parallel_size", "1", "--target_expert_model_parallel_size",
                                     "4", "--moe_grouped_gemm", "--transformer_impl", "transformer_engine"]),
}
# (TP, EP) megatron-core runs a tree at; PP from its args; others TP2
ORACLE_LAYOUTS = {"te_tp1": (1, 1), "local_ep2pp2": (1, 2), "local_tp2ep2": (2, 2)}
BY_NAME = {variant.name: variant for variant in VARIANTS}


def _cases(for_variant) -> list:
    return [pytest.param(variant.name, case, id=f"{variant.name}-{case}")
            for variant in VARIANTS for case in for_variant(variant)]


def _hf_round_trips(variant: Variant) -> list[str]:
    return ["te_tp2pp2", "local_tp2pp2", "legacy_tp2pp2"] + (["local_ep2pp2", "local_tp2ep2"] if variant.experts else [])


def _reshapes(variant: Variant) -> list[str]:
    return ["reshaped"] + (["reshaped_ep2", "grouped_ep4"] if variant.experts else [])


def _oracle_runs(variant: Variant) -> list[str]:
    """Megatron-core loads: our TP2 PP2 local rank files, TP1 Transformer Engine ones, our torch_dist at TP2
    (and for experts EP2 PP2 and TP2 x EP2 rank files)."""
    return ["local_tp2pp2", "te_tp1", "dist"] + (["local_ep2pp2", "local_tp2ep2"] if variant.experts else [])


class Kit:
    """Every variant's Hugging Face model, its logits and converted trees, each made once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, tuple[Path, torch.Tensor]] = {}
        self.trees: dict[tuple[str, str], Path] = {}

    def hf(self, name: str) -> tuple[Path, torch.Tensor]:
        if name not in self.models:
            path = self.root / name / "hf"
            self.models[name] = path, logits_of(BY_NAME[name].build(path))
        return self.models[name]

    def tree(self, name: str, tree: str) -> Path:
        if (name, tree) not in self.trees:
            source, flags = TREES[tree]
            load = self.tree(name, source) if source else self.hf(name)[0]
            path = self.root / name / tree
            assert convert("--load_path", load, "--save_path", path, "--to", "megatron", *flags) == 0
            self.trees[name, tree] = path
        return self.trees[name, tree]

    def back_to_hf(self, name: str, tree: str) -> Path:
        path = self.root / name / f"{tree}_hf"
        if not path.exists():
            assert convert("--load_path", self.tree(name, tree), "--save_path", path, "--to", "hf") == 0
        return path


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    return Kit(tmp_path_factory.mktemp("kit"))


def test_every_registered_family_has_a_variant():
    # multi-tower (vision-language) families are proven by their own image+text tests (tests/test_qwen2_vl.py)
    towered = {name for name, spec in registered().items() if spec.towers}
    assert set(registered()) - towered <= {variant.family for variant in VARIANTS}, \
        "add the new family's variants to family_kit"
    assert {variant.family for variant in VARIANTS} <= set(registered())
    assert len(BY_NAME) == len(VARIANTS), "variant names must be unique"


# config values a model derives when config.json leaves them null (our output spells them out)
DERIVED = {"head_dim": lambda config: config["hidden_size"] // config["num_attention_heads"],
           "n_inner": lambda config: 4 * config["n_embd"]}


def _config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    for values in (config, *(config.get(sub) or {} for sub in ("text_config", "vision_config"))):
        for key, derive in DERIVED.items():
            if key in values and values[key] is None:
                values[key] = derive(values)
    return config


def _assert_same_config(original: Path, converted: Path, family: str) -> None:
    """Every key of the original config.json comes back with its value (the version stamp aside)."""
    before, after = _config(original), _config(converted)
    assert after["model_type"] == family
    differing = _differing(before, after)
    assert not differing, differing


def _differing(before: dict, after: dict) -> dict:
    """The original's keys whose values differ; a sub-config (``text_config``, ``vision_config``) key by key."""
    differing = {}
    for key, value in before.items():
        if key.endswith("_config") and isinstance(value, dict) and isinstance(after.get(key), dict):
            differing.update({f"{key}.{sub}": both for sub, both in _differing(value, after[key]).items()})
        elif key != "transformers_version" and after.get(key) != value:
            differing[key] = (value, after.get(key))
    return differing


@pytest.mark.parametrize("name, tree", _cases(_hf_round_trips))
def test_hf_to_megatron_to_hf(kit, capsys, name, tree):
    variant = BY_NAME[name]
    path, expected = kit.hf(name)
    if tree == "legacy_tp2pp2" and not variant.legacy:
        out = kit.root / name / tree
        assert convert("--load_path", path, "--save_path", out, "--to", "megatron", *TREES[tree][1]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "legacy Megatron model has no" in err and not out.exists()
        return
    back = kit.back_to_hf(name, tree)
    assert_logits_close(logits_of(back), expected)
    _assert_same_config(path, back, variant.model_type or variant.family)


@pytest.mark.parametrize("name, tree", _cases(_reshapes))
def test_megatron_reshape(kit, name, tree):
    """TP2 PP2 (Transformer Engine naming) -> TP1, uneven stages (and EP2 or local naming) -> Hugging Face."""
    assert_logits_close(logits_of(kit.back_to_hf(name, tree)), kit.hf(name)[1])


@pytest.mark.parametrize("name", [variant.name for variant in VARIANTS])
def test_torch_dist_round_trips(kit, name):
    """Hugging Face -> torch_dist -> Hugging Face, and TP2 PP2 rank files -> torch_dist -> Hugging Face."""
    for tree in ("dist", "dist_from_ranks"):
        assert_logits_close(logits_of(kit.back_to_hf(name, tree)), kit.hf(name)[1])


@pytest.mark.parametrize("name", [variant.name for variant in VARIANTS])
def test_megatron_args_that_name_no_family(kit, name):
    """Megatron-LM's args do not record our ``hf_family``: the architecture alone picks the family, and the
    Hugging Face model it converts to computes the original's logits."""
    variant = BY_NAME[name]
    tree = kit.root / name / "unrecorded"
    shutil.copytree(kit.tree(name, "te_tp1"), tree)
    rank_file = tree / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    del state["args"].hf_family
    torch.save(state, rank_file)
    assert convert("--load_path", tree, "--save_path", kit.root / name / "unrecorded_hf", "--to", "hf") == 0
    config = json.loads((kit.root / name / "unrecorded_hf" / "config.json").read_text())
    assert config["model_type"] == (variant.model_type or variant.detected_as or variant.family)
    assert_logits_close(logits_of(kit.root / name / "unrecorded_hf"), kit.hf(name)[1])


def _made_spec(kit: Kit, name: str) -> Path:
    """The architecture args our conversion wrote, as megatron-core's model maker reads them (JSON)."""
    rank_file = next((kit.tree(name, "te_tp1") / "release").glob("*/model_optim_rng.pt"))
    args = torch.load(rank_file, weights_only=False)["args"]
    spec = {key: value for key, value in plain_fields(args).items() if not isinstance(value, torch.dtype)}
    path = kit.root / name / "made_spec.json"
    path.write_text(json.dumps({**spec, "seed": 11}))
    return path


def _flip_softmax_order(state: dict) -> None:
    state["args"].moe_router_pre_softmax = not state["args"].moe_router_pre_softmax


def _no_groups(state: dict) -> None:
    state["args"].moe_router_group_topk = state["args"].moe_router_num_groups = None


def _no_scaling(state: dict) -> None:
    state["args"].moe_router_topk_scaling_factor = None


def _zero_expert_bias(state: dict) -> None:
    for key, value in state["model"].items():
        if key.endswith("router.expert_bias"):
            value.zero_()


# a routing feature -> how a rank file loses it: softmax before or after the top-k (the k weights renormalised or
# not) swapped, the group limit, the weights' scaling or the expert bias dropped
WRONG_ROUTINGS = {"softmax_order": _flip_softmax_order, "groups": _no_groups, "scaling": _no_scaling,
                  "expert_bias": _zero_expert_bias}


def _other_routing(kit: Kit, name: str, feature: str) -> Path:
    """Our TP1 rank files telling megatron-core a routing without ``feature`` (:data:`WRONG_ROUTINGS`)."""
    tree = kit.root / name / f"without_{feature}"
    shutil.copytree(kit.tree(name, "te_tp1"), tree)
    rank_file = tree / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    WRONG_ROUTINGS[feature](state)
    torch.save(state, rank_file)
    return tree


def _oracle_jobs(kit: Kit, tokens: Path, variants: list[Variant]) -> list[dict]:
    jobs = []
    for variant in variants:
        out = kit.root / variant.name
        for tree in _oracle_runs(variant):
            kind = "dist-logits" if tree == "dist" else "logits"
            tp, ep = ORACLE_LAYOUTS.get(tree, (2, 1))
            jobs.append(dict(kind=kind, name=f"{variant.name}-{tree}", ckpt=str(kit.tree(variant.name, tree)),
                             tokens=str(tokens), out=str(out / f"megatron_core_{tree}.pt"), tp=tp, ep=ep))
        for feature in variant.routing if variant.experts else ():
            jobs.append(dict(kind="logits", name=f"{variant.name}-without-{feature}",
                             ckpt=str(_other_routing(kit, variant.name, feature)), tokens=str(tokens),
                             out=str(out / f"megatron_core_without_{feature}.pt"), tp=1, ep=1))
        jobs.append(dict(kind="dist-make", name=f"{variant.name}-made", spec=str(_made_spec(kit, variant.name)),
                         tokens=str(tokens), out=str(out / "made"), logits_out=str(out / "made_logits.pt"), tp=2))
    return jobs


def _selected_variants(session: pytest.Session) -> list[Variant]:
    """The variants of the tests this run selected (all of them in CI; fewer with ``-k``)."""
    names = {item.callspec.params.get("name") for item in session.items if hasattr(item, "callspec")}
    return [variant for variant in VARIANTS if variant.name in names]


@pytest.fixture(scope="module")
def megatron_core(kit, request) -> str:
    """Runs every oracle job of every selected variant in one batch of four gloo processes; returns its error
    output."""
    torch.save(TOKENS, kit.root / "tokens.pt")
    jobs = _oracle_jobs(kit, kit.root / "tokens.pt", _selected_variants(request.session))
    (kit.root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, str(ORACLE), "batch", kit.root / "jobs.json", "4"], capture_output=True,
                            text=True, timeout=600)
    return "" if result.returncode == 0 else result.stderr[-4000:]


@pytest.mark.parametrize("name, tree", _cases(_oracle_runs))
def test_megatron_core_logits_of_our_output(kit, megatron_core, name, tree):
    assert not megatron_core, megatron_core
    logits = torch.load(kit.root / name / f"megatron_core_{tree}.pt")
    assert_logits_close(logits, kit.hf(name)[1], atol=MEGATRON_CORE_ATOL)


@pytest.mark.parametrize("name, feature", [pytest.param(variant.name, feature, id=f"{variant.name}-{feature}")
                                           for variant in VARIANTS if variant.experts for feature in variant.routing])
def test_megatron_core_routes_as_hugging_face_only_with_the_router_args_we_write(kit, megatron_core, name, feature):
    """The routing is part of the conversion: without any one of the variant's routing features (softmax before or
    after the top-k, groups, scaling, expert bias), megatron-core misses the original's logits by far more than the
    tolerance."""
    assert not megatron_core, megatron_core
    logits = torch.load(kit.root / name / f"megatron_core_without_{feature}.pt")
    assert (logits - kit.hf(name)[1]).abs().max() > 100 * MEGATRON_CORE_ATOL


@pytest.mark.parametrize("name", [variant.name for variant in VARIANTS])
def test_torch_dist_saved_by_megatron_core_converts_to_hf(kit, megatron_core, name):
    """megatron-core builds a random model from the args we write, saves it at TP2 with its own
    ``dist_checkpointing.save`` (its own key names), and our Hugging Face conversion computes its logits."""
    assert not megatron_core, megatron_core
    out = kit.root / name / "made_hf"
    assert convert("--load_path", kit.root / name / "made", "--save_path", out, "--to", "hf") == 0
    assert json.loads((out / "config.json").read_text())["model_type"] in (BY_NAME[name].family,
                                                                           BY_NAME[name].model_type)
    assert_logits_close(logits_of(out), torch.load(kit.root / name / "made_logits.pt"), atol=MEGATRON_CORE_ATOL)


@pytest.mark.parametrize("name", [variant.name for variant in VARIANTS])
def test_inspect_check_and_verify(kit, capsys, name):
    tree = kit.tree(name, "te_tp2pp2")
    assert run_inspect_cli([str(tree), "--json", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == BY_NAME[name].family and report["problems"] == []
    assert run_verify_cli([str(kit.hf(name)[0]), str(tree), "--logits"]) == 0
    assert capsys.readouterr().out.endswith("EQUAL\n")
    assert run_verify_cli([str(kit.hf(name)[0]), str(kit.tree(name, "dist_from_ranks"))]) == 0
    assert capsys.readouterr().out.endswith("EQUAL\n")


# ---- multi-tower (vision-language) families: tests/family_kit.py TOWER_VARIANTS

def test_tower_variants_name_registered_multi_tower_families():
    # every multi-tower family with a Megatron layout; OpenGVLab's InternVL layout is a source only (written back in
    # transformers' layout: tests/test_internvl.py)
    towered = {name for name, spec in registered().items() if spec.towers and spec.mindspeed_mm is not None
               or spec.mcore_vlm is not None or spec.towers and spec.bridge is not None} - {"internvl_chat"}
    assert towered <= {variant.family for variant in TOWER_VARIANTS} <= {name for name, spec in registered().items()
                                                                        if spec.towers}
    assert len({variant.name for variant in TOWER_VARIANTS}) == len(TOWER_VARIANTS), "variant names must be unique"


def _tower_logits(path: Path, family: str) -> torch.Tensor:
    """The Hugging Face model's logits on the family's fixed image+text input."""
    import transformers
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    spec = registered()[family]
    with torch.no_grad():
        return model(**spec.logits_inputs(spec.arch_from_hf_config(model.config))).logits.float()


@pytest.mark.parametrize("variant", TOWER_VARIANTS, ids=lambda variant: variant.name)
def test_multi_tower_family_through_its_megatron_layout(tmp_path, capsys, variant: TowerVariant):
    """A dry run writes nothing; the layout at TP2 over two pipeline ranks and back gives the original's logits and
    config; inspect names the family; verify --logits feeds both the image and text."""
    source = variant.build(tmp_path / "hf")
    original = _tower_logits(source, variant.family)
    tree, back = tmp_path / "megatron", tmp_path / "back"
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", tree, "--to", "megatron", *variant.layout, "--dry_run") == 0
    assert not tree.exists()
    assert convert("--load_path", source, "--save_path", tree, "--to", "megatron", *variant.layout) == 0
    assert convert("--load_path", tree, "--save_path", back, "--to", "hf", *variant.read(source)) == 0
    assert_logits_close(_tower_logits(back, variant.family), original)
    _assert_same_config(source, back, variant.family)
    capsys.readouterr()
    for path, flags in ((source, ()), (tree, variant.read(source))):
        assert run_inspect_cli([str(path), "--json", "--check", *flags]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["family"] == variant.family and report["problems"] == [], report["problems"]
    assert run_verify_cli([str(source), str(tree), "--logits", *variant.read(source)]) == 0
    assert "logits: max |diff| 0" in capsys.readouterr().out
