"""FSDP2 (`fsdp_version: 2`) through the real `axolotl train` CLI on 2 CPU ranks.

Axolotl's own FSDP2 code (its loader, `fsdp2_prepare_model`, its final save) runs
over gloo; the only change is the test-only patch in tests/cpu_distributed
(accelerate's FSDP selection for CPU ranks, axolotl's literal "cuda" devices).
"""

from __future__ import annotations

import re
import shutil
import tempfile

import pytest
import safetensors.torch
import torch

from axolotl_cli import (
    base_config,
    resume_after_step2,
    run_axolotl_on_cpu_nodes,
    run_axolotl_on_cpu_ranks,
    training_logs,
)
from fused_vs_plain import (
    FUSED_SETTINGS,
    assert_fused_equals_plain,
    assert_sharded_head_took_the_fused_path,
    plain_config,
)
from probe_checks import (
    PROBE,
    assert_factors_match_unsharded,
    assert_saved_adapters_reproduce_the_run,
    ok,
    pretrained_logits,
)

pytestmark = pytest.mark.slow

# Same batches, same optimizer state, float32: measured 0.0 for both state dict types.
RESUME_TOLERANCE = 1e-5


def fsdp2_config(state_dict_type: str, **fsdp_options) -> dict:
    return {
        "fsdp_version": 2,
        "fsdp_config": {
            "offload_params": False,
            "state_dict_type": state_dict_type,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "reshard_after_forward": True,
            **fsdp_options,
        },
    }


def fsdp2_run(config: dict, workdir):
    probe = workdir / "probe"
    return run_axolotl_on_cpu_ranks(config, workdir, "fsdp", extra_env={"BALORA_PROBE_DIR": str(probe)})


def uninterrupted_run(state_dict_type: str, model_dir, dataset, tmp_path_factory) -> dict:
    """4 steps on 2 ranks in float32, checkpoints at steps 2 and 4, on the fused loss path with the
    output layer sharded (`reshard_after_forward` on the root)."""
    workdir = tmp_path_factory.mktemp(state_dict_type.split("_")[0].lower())
    config = base_config(
        model_dir, dataset, workdir, plugins=["axolotl_balora.BALoRAPlugin", PROBE],
        balora_init="pissa", gradient_accumulation_steps=1, save_strategy="steps", save_steps=2,
        **FUSED_SETTINGS, **fsdp2_config(state_dict_type),
    )
    text = ok(fsdp2_run(config, workdir))
    return {"config": config, "workdir": workdir, "text": text, "state_dict_type": state_dict_type}


@pytest.fixture(scope="module")
def uninterrupted_full(tiny_llama_dir, tiny_dataset, tmp_path_factory):
    return uninterrupted_run("FULL_STATE_DICT", tiny_llama_dir, tiny_dataset, tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted_sharded(tiny_llama_dir, tiny_dataset, tmp_path_factory):
    return uninterrupted_run("SHARDED_STATE_DICT", tiny_llama_dir, tiny_dataset, tmp_path_factory)


@pytest.fixture(params=["FULL_STATE_DICT", "SHARDED_STATE_DICT"], ids=["full", "sharded"])
def uninterrupted(request):
    """The uninterrupted run of each state dict type (each runs once per module)."""
    return request.getfixturevalue(f"uninterrupted_{request.param.split('_')[0].lower()}")


@pytest.fixture(scope="module")
def plain_full(uninterrupted_full, tmp_path_factory):
    """The uninterrupted FULL_STATE_DICT run's first 2 steps on the plain loss path."""
    workdir = tmp_path_factory.mktemp("plain")
    return {"workdir": workdir, "text": ok(fsdp2_run(plain_config(uninterrupted_full["config"], workdir), workdir))}


def test_fsdp2_sharded_head_takes_the_fused_path(uninterrupted_full, plain_full):
    assert_sharded_head_took_the_fused_path(uninterrupted_full, plain_full)


def test_fsdp2_sharded_fused_path_equals_the_plain_path(uninterrupted_full, plain_full):
    assert_fused_equals_plain(uninterrupted_full, plain_full)


def test_fsdp2_final_adapter_is_the_standard_export(uninterrupted, tiny_llama_dir, tmp_path):
    """Axolotl saves the final FSDP2 adapter itself; it must be the rank-2r export too."""
    workdir = uninterrupted["workdir"]
    begin = torch.load(workdir / "probe" / "logits_begin.pt")
    assert begin["engine"].startswith("FSDP") and begin["dtypes"] == ["torch.float32"]
    assert_factors_match_unsharded(workdir / "probe", tiny_llama_dir, workdir / "out" / "balora_state", exact=True)
    if uninterrupted["state_dict_type"] == "SHARDED_STATE_DICT":  # the export besides the DCP shards
        assert (workdir / "out" / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    assert_saved_adapters_reproduce_the_run(workdir, tiny_llama_dir, tmp_path, lora_r=uninterrupted["config"]["lora_r"])
    assert "saving the FSDP2 final adapter" in uninterrupted["text"]
    for rank in (0, 1):  # the ranks split the 14 target layers and share the factors
        assert f"rank {rank} of 2 took 7 of 14 layers" in uninterrupted["text"]


# FULL_STATE_DICT's resume is the relaunch in test_a_rank_killed_mid_training_resumes_from_the_last_checkpoint.
@pytest.mark.parametrize("uninterrupted", ["SHARDED_STATE_DICT"], indirect=True)
def test_fsdp2_resumed_run_ends_with_the_uninterrupted_adapter(uninterrupted, tmp_path):
    source = uninterrupted["workdir"] / "out"
    config, output = resume_after_step2(uninterrupted["config"], source, tmp_path)
    logs = training_logs(ok(fsdp2_run(config, tmp_path)))
    assert len(logs) == 2  # steps 3 and 4 only
    expected = safetensors.torch.load_file(source / "adapter_model.safetensors")
    got = safetensors.torch.load_file(output / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= RESUME_TOLERANCE


def test_fsdp2_rank0_loading_keeps_the_frozen_factors_frozen(tiny_llama_dir, tiny_dataset, tmp_path):
    """`cpu_ram_efficient_loading: true`: only rank 0 reads the checkpoint (rank 1 holds meta
    tensors until axolotl broadcasts rank 0's state dict after sharding, which re-creates every
    buffer as a parameter that requires grad). Gradient clipping is on."""
    config = base_config(
        tiny_llama_dir, tiny_dataset, tmp_path, plugins=["axolotl_balora.BALoRAPlugin", PROBE],
        balora_init="pissa", gradient_accumulation_steps=1, save_strategy="steps", save_steps=2,
        max_grad_norm=1.0, **fsdp2_config("FULL_STATE_DICT", cpu_ram_efficient_loading=True),
    )
    text = ok(fsdp2_run(config, tmp_path))
    assert "rank 0 of 2 took 14 of 14 layers" in text and "rank 1 of 2 took 0 of 14 layers" in text
    # axolotl 0.19's loader re-creates the 28 frozen factors as parameters; the probe below sees
    # buffers only if they were turned back (or never changed)
    restored = re.search(r"(\d+) frozen factors came back from the engine's loading as parameters", text)
    assert restored is None or restored.group(1) == "28"
    probe = tmp_path / "probe"
    # buffers again on both ranks, bit-identical, equal to one process's factors of the real weights
    assert_factors_match_unsharded(probe, tiny_llama_dir, tmp_path / "out" / "balora_state", exact=True)
    begin = torch.load(probe / "logits_begin.pt")
    assert begin["dtypes"] == ["torch.float32"]
    assert torch.equal(begin["off"], pretrained_logits(tiny_llama_dir, probe))
    assert (begin["on"] - begin["off"]).abs().max() <= 1e-6 * begin["off"].abs().max()
    logs = training_logs(text)
    assert len(logs) == config["max_steps"] and abs(logs[0]["balora/consistency"]) < 1e-4
    assert all(0 < log["grad_norm"] < float("inf") for log in logs)
    assert_saved_adapters_reproduce_the_run(tmp_path, tiny_llama_dir, tmp_path / "reload", lora_r=config["lora_r"])


@pytest.fixture(scope="module")
def kernels_from_the_cache(uninterrupted_full, tmp_path_factory):
    """The uninterrupted FULL_STATE_DICT run again with `lora_qkv_kernel` / `lora_o_kernel` on and its
    PiSSA factors read from a copy of that run's factor cache: one 2-rank run for two checks."""
    first = uninterrupted_full
    workdir = tmp_path_factory.mktemp("kernels-from-the-cache")
    shutil.copytree(first["workdir"] / "init-cache", workdir / "cache")
    config = {**first["config"], "output_dir": str(workdir / "out"), "dataset_prepared_path": str(workdir / "prepared"),
              "balora_init_cache": str(workdir / "cache"), "lora_qkv_kernel": True, "lora_o_kernel": True}
    return {"first": first, "config": config, "workdir": workdir, "text": ok(fsdp2_run(config, workdir))}


def test_fsdp2_second_run_loads_the_factors_from_the_cache(kernels_from_the_cache):
    first, second = kernels_from_the_cache["first"], kernels_from_the_cache
    assert "(0 from the cache" in first["text"] and "(7 from the cache" not in first["text"]
    assert second["text"].count("took 7 of 14 layers (7 from the cache") == 2  # both ranks
    assert len(list((second["workdir"] / "cache").rglob("*.safetensors"))) == 14
    for rank in (0, 1):
        expected, got = (safetensors.torch.load_file(run["workdir"] / "probe" / f"factors_rank{rank}.safetensors")
                         for run in (first, second))
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_fsdp2_with_the_fused_lora_kernels_trains_like_the_unfused_run(kernels_from_the_cache, tiny_llama_dir):
    """`lora_qkv_kernel` / `lora_o_kernel` on 2 FSDP2 ranks: the kernels read the trainable pair
    outside its module's forward (axolotl unshards it) and still get BA-LoRA's stacked update."""
    run, workdir = kernels_from_the_cache, kernels_from_the_cache["workdir"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"a fused LoRA kernel computed {name} " in run["text"], name
    probe = workdir / "probe"
    begin = torch.load(probe / "logits_begin.pt")
    assert begin["engine"].startswith("FSDP")
    # the MLP projections (no kernel) take PEFT's two-adapter forward under FSDP2: (x + y) - y
    assert (begin["on"] - begin["off"]).abs().max() <= 1e-6 * begin["off"].abs().max()
    torch.testing.assert_close(begin["off"], pretrained_logits(tiny_llama_dir, probe), rtol=1e-5, atol=1e-5)
    assert_saved_adapters_reproduce_the_run(workdir, tiny_llama_dir, workdir / "reload", lora_r=run["config"]["lora_r"])
    unfused = safetensors.torch.load_file(run["first"]["workdir"] / "out" / "adapter_model.safetensors")
    fused = safetensors.torch.load_file(workdir / "out" / "adapter_model.safetensors")
    assert fused.keys() == unfused.keys()
    assert max((fused[k] - unfused[k]).abs().max().item() for k in fused) <= RESUME_TOLERANCE


# --------------------------------------------------------------------------- faults
# Each compares with the uninterrupted FULL_STATE_DICT run above (4 steps, checkpoints at 2 and 4).
# The bound for a resumed run is 1e-4; the same batches and optimizer state give 0.0 here.
FAULT_TOLERANCE = 1e-4
FAULTS = "faults.FaultPlugin"


def _adapter_difference(expected_dir, got_dir) -> float:
    expected = safetensors.torch.load_file(expected_dir / "adapter_model.safetensors")
    got = safetensors.torch.load_file(got_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    return max((expected[k] - got[k]).abs().max().item() for k in expected)


def _files(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _killed_then_resumed(uninterrupted, workdir, fault: str):
    """The uninterrupted run's config with rank 1 killed at `fault`, then relaunched as a user
    would: the same YAML with `auto_resume_from_checkpoints: true`."""
    config = {**uninterrupted["config"], "output_dir": str(workdir / "out"),
              "dataset_prepared_path": str(workdir / "prepared"),
              "plugins": [*uninterrupted["config"]["plugins"], FAULTS]}
    killed = run_axolotl_on_cpu_ranks(config, workdir / "killed", "fsdp",
                                      extra_env={"BALORA_PROBE_DIR": str(workdir / "probe"), "BALORA_FAULT": fault})
    text = killed.stdout + killed.stderr
    assert killed.returncode != 0 and "[faults] rank 1: SIGKILL" in text, text[-3000:]
    return config, text


def _relaunch(config, workdir):
    resumed = {**config, "auto_resume_from_checkpoints": True}
    return ok(run_axolotl_on_cpu_ranks(resumed, workdir / "resumed", "fsdp",
                                       extra_env={"BALORA_PROBE_DIR": str(workdir / "probe")}))


@pytest.mark.parametrize("uninterrupted", ["FULL_STATE_DICT"], indirect=True)
def test_a_rank_killed_mid_training_resumes_from_the_last_checkpoint(uninterrupted, tmp_path):
    config, _ = _killed_then_resumed(uninterrupted, tmp_path, "step:3")
    output = tmp_path / "out"
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2"]
    text = _relaunch(config, tmp_path)
    assert len(training_logs(text)) == 2  # steps 3 and 4 only: it resumed from checkpoint-2
    assert _adapter_difference(uninterrupted["workdir"] / "out", output) <= FAULT_TOLERANCE


@pytest.mark.parametrize("uninterrupted", ["FULL_STATE_DICT"], indirect=True)
def test_a_checkpoint_torn_by_a_killed_rank_is_never_resumed_from(uninterrupted, tmp_path):
    """Rank 1 dies while checkpoint-4 is being written (adapters in, optimizer and trainer state
    not). Axolotl's auto-resume picks the highest checkpoint; the run must take checkpoint-2."""
    config, _ = _killed_then_resumed(uninterrupted, tmp_path, "save:4")
    output = tmp_path / "out"
    torn = output / "checkpoint-4"
    assert torn.is_dir() and not (torn / "trainer_state.json").exists()
    earlier = _files(output / "checkpoint-2")
    text = _relaunch(config, tmp_path)
    assert f"{torn} is incomplete" in text and f"resuming from {output / 'checkpoint-2'}" in text
    assert len(training_logs(text)) == 2  # steps 3 and 4: from checkpoint-2, not from the torn one
    assert _files(output / "checkpoint-2") == earlier  # the complete checkpoint is untouched
    assert (torn / "trainer_state.json").is_file()  # step 4 saved again, whole
    assert _adapter_difference(uninterrupted["workdir"] / "out", output) <= FAULT_TOLERANCE
    assert _adapter_difference(uninterrupted["workdir"] / "out" / "checkpoint-4", torn) <= FAULT_TOLERANCE


@pytest.mark.parametrize("uninterrupted", ["FULL_STATE_DICT"], indirect=True)
def test_two_nodes_of_one_rank_give_what_one_node_of_two_ranks_gives(uninterrupted, tmp_path):
    """`torchrun --nnodes 2` on this machine, each node with its own dataset preparation, factor
    cache, Hugging Face cache and temporary folder, the output folder shared (as on a cluster's
    shared file system): the split PiSSA init, the cache and every save match the one-node run."""
    reference = uninterrupted["workdir"]
    configs, workdirs, envs = [], [], []
    for node in (0, 1):
        local = tmp_path / f"node{node}"
        configs.append({**uninterrupted["config"], "output_dir": str(tmp_path / "out"),
                        "dataset_prepared_path": str(local / "prepared")})
        workdirs.append(local)
        # A short TMPDIR of its own: the dataset pool's manager listens on a Unix socket in it, and
        # a socket path over 107 bytes (a pytest-xdist worker's tmp_path is long) cannot be bound.
        envs.append({"BALORA_PROBE_DIR": str(tmp_path / "probe"), "TMPDIR": tempfile.mkdtemp(prefix=f"node{node}-"),
                     "HF_HOME": str(local / "hf"), "BALORA_INIT_CACHE_DIR": str(local / "init-cache")})
    try:
        texts = [ok(result) for result in run_axolotl_on_cpu_nodes(configs, workdirs, "fsdp", envs)]
    finally:
        for env in envs:
            shutil.rmtree(env["TMPDIR"], ignore_errors=True)
    assert "rank 0 of 2 took 7 of 14 layers" in texts[0] and "rank 1 of 2 took 7 of 14 layers" in texts[1]
    for rank in (0, 1):  # the factors each rank held, bit for bit
        expected = safetensors.torch.load_file(reference / "probe" / f"factors_rank{rank}.safetensors")
        got = safetensors.torch.load_file(tmp_path / "probe" / f"factors_rank{rank}.safetensors")
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # each node cached the layers it decomposed; together, the one-node run's cache
    node_caches = [sorted(path.name for path in (tmp_path / f"node{node}" / "init-cache").rglob("*.safetensors"))
                   for node in (0, 1)]
    assert len(node_caches[0]) == len(node_caches[1]) == 7 and not set(node_caches[0]) & set(node_caches[1])
    one_node = {path.name: path for path in (reference / "init-cache").rglob("*.safetensors")}
    assert sorted(one_node) == sorted(node_caches[0] + node_caches[1])
    for node, names in enumerate(node_caches):
        for name in names:
            cached = next((tmp_path / f"node{node}" / "init-cache").rglob(name))
            assert cached.read_bytes() == one_node[name].read_bytes(), name
    for saved in ("checkpoint-2", "checkpoint-4", "."):
        assert _adapter_difference(reference / "out" / saved, tmp_path / "out" / saved) <= 1e-6, saved
