"""model.lora_sync adapter: each push sends the LoRA adapter alone (POST /weights/adapter), vLLM loads it
under a new name, id and path per version and samples with it; a full push keeps it; the probe's
`adapter_effect` catches merged 16-bit weights that lost most of a small update."""

import pytest
import torch
from support.constants import SERVER_TOKEN
from support.launcher import launch
from support.models import lora_model
from support.reference import hf_logprobs, peft_logprobs
from support.runs import read_metrics
from support.servers import local_server
from transformers import AutoModelForCausalLM

from pipeline.generation.client import ServerError
from pipeline.generation.engines import Engines
from pipeline.sync.lora_export import adapter_file, adapter_state
from pipeline.sync.weight_sync import WeightSync
from pipeline.trainer.server_link import adapter_effect

PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have?"


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, tmp_path_factory):
    server = local_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("lora-server"),
        "--set",
        "model.lora_rank=4",
        token=SERVER_TOKEN,
    )
    yield server
    server.stop()


def sample(client, prompt_ids):
    out = client.generate([prompt_ids], n=1, max_tokens=16, seed=0)
    return out["version"], out["results"][0]["completions"][0]


def test_served_adapter_matches_peft_and_each_version_replaces_the_last(lora_server, tiny_model_dir):
    client = lora_server.client
    info = client.model_info()
    assert info["lora_adapters"] and info["max_lora_rank"] == 8 and info["adapter"] is None  # 4 -> vLLM's 8
    prompt = client.request("POST", "/generate", {"prompts": [PROMPT], "max_tokens": 1})["results"][0][
        "prompt_token_ids"
    ]
    base_version, base_completion = sample(client, prompt)
    for version, seed in ((1, 0), (2, 1)):
        model = lora_model(tiny_model_dir)
        if seed:
            torch.manual_seed(seed)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.normal_(0, 0.05)
        body = adapter_file(model, adapter_state(model, 0), version)
        answer = client.request("POST", "/weights/adapter", data=body)
        assert answer["version"] == version and answer["adapter"].startswith(f"policy-v{version}-")
        served_version, completion = sample(client, prompt)
        assert served_version == version
        # sampled with the adapter: its logprobs are PEFT's, on the decode and the scoring path
        ids = completion["token_ids"]
        want = peft_logprobs(model, prompt, ids)
        assert (torch.tensor(completion["logprobs"]) - want).abs().max() <= 1e-3
        assert (torch.tensor(client.score([(prompt, ids)])["logprobs"][0]) - want).abs().max() <= 1e-3
    assert (
        torch.tensor(client.score([(prompt, base_completion["token_ids"])])["logprobs"][0])
        - hf_logprobs(tiny_model_dir, prompt, base_completion["token_ids"])
    ).abs().max() > 1e-3  # not the base
    assert client.model_info()["adapter"].startswith("policy-v2-") and base_version == 0


def test_a_refused_adapter_is_a_400_and_the_previous_one_stays(lora_server, tiny_model_dir):
    client = lora_server.client
    model = lora_model(tiny_model_dir)
    client.request("POST", "/weights/adapter", data=adapter_file(model, adapter_state(model, 0), 7))
    for body, message in (
        (b"not a safetensors file", "expected a safetensors file whose metadata holds version"),
        (adapter_file(lora_model(tiny_model_dir, rank=16), {}, 8), "rank 16 is not in 1..8"),
    ):
        with pytest.raises(ServerError, match=message) as refused:
            client.request("POST", "/weights/adapter", data=body)
        assert refused.value.status == 400
    assert client.health()["version"] == 7 and client.model_info()["adapter"].startswith("policy-v7-")


def test_a_full_push_keeps_the_adapter_and_verifies_the_wrapped_base_weights(lora_server, tiny_model_dir):
    """vLLM drops every adapter when a weight update finishes: the server loads it again. The full push's
    checksums still find the base weights vLLM's LoRA wrappers hold (`.base_layer.`)."""
    client = lora_server.client
    model = lora_model(tiny_model_dir)
    client.request("POST", "/weights/adapter", data=adapter_file(model, adapter_state(model, 0), 3))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sync = WeightSync(
        plain,
        0,
        0,
        torch.device("cpu"),
        Engines([client.base_url], SERVER_TOKEN),
        host="127.0.0.1",
        timeout_s=60,
    )
    sync.connect()
    stats = sync.push(4)
    sync.close()
    assert stats["verified_bytes_frac"] == 1.0 and not sync.adapter_mode  # a plain model: full pushes
    assert any(".qkv_proj." in n or "q_proj" in n for n in sync.verified_names)
    prompt = client.request("POST", "/generate", {"prompts": [PROMPT], "max_tokens": 1})["results"][0][
        "prompt_token_ids"
    ]
    version, completion = sample(client, prompt)
    assert version == 4 and client.model_info()["adapter"].startswith("policy-v3-")
    want = peft_logprobs(model, prompt, completion["token_ids"])  # the same base, the same adapter
    assert (torch.tensor(completion["logprobs"]) - want).abs().max() <= 1e-3


def test_adapter_effect_tells_an_engine_serving_the_base_from_one_serving_the_adapter(
    lora_server, tiny_model_dir
):
    """The probe's `adapter_effect` with real served logprobs: 0 while the engine serves the base model (an
    adapter it never got, or lost), 1 once it serves the adapter; kernel noise averages out of it."""
    client = lora_server.client
    model = lora_model(tiny_model_dir)
    prompt = client.request("POST", "/generate", {"prompts": [PROMPT], "max_tokens": 1})["results"][0][
        "prompt_token_ids"
    ]
    completion = sample(client, prompt)[1]["token_ids"]
    on = peft_logprobs(model, prompt, completion)
    with model.disable_adapter():
        off = peft_logprobs(model, prompt, completion)
    client.request("POST", "/weights/adapter", data=adapter_file(model, adapter_state(model, 0), 9))
    served = torch.tensor(client.score([(prompt, completion)])["logprobs"][0])
    effect, shift = adapter_effect(served, on, off)
    assert effect == pytest.approx(1.0, abs=1e-3) and shift > 1e-2
    other = lora_model(tiny_model_dir)  # the engine holds another adapter (the base + noise for this one)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.zero_()
    client.request("POST", "/weights/adapter", data=adapter_file(other, adapter_state(other, 0), 10))
    served = torch.tensor(client.score([(prompt, completion)])["logprobs"][0])
    assert abs(adapter_effect(served, on, off)[0]) < 1e-3


@pytest.mark.e2e
def test_a_lora_run_pushes_the_adapter_and_resumes(warm_model_dir, tmp_path):
    """The launcher's own server takes adapters (model.lora_rank > 0, lora_sync auto): every push is the
    adapter (kilobytes, not the model), the probe sees all of its effect, a resumed run pushes it again."""
    common = [
        "--name",
        "adapter",
        "--set",
        f"model.path={warm_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "model.lora_rank=8",
        "--set",
        "train.learning_rate=1e-3",
        "--set",
        "eval.enabled=false",
        "--set",
        "train.save_every=2",
        "--set",
        "server.kv_cache_gib=1",
    ]
    proc = launch(*common, "--set", "train.max_steps=2", root=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = launch(*common, "--resume", "--force", "--set", "train.max_steps=3", root=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = read_metrics(tmp_path / "adapter")
    assert [r["step"] for r in rows] == [1, 2, 3]
    model_bytes = sum(f.stat().st_size for f in warm_model_dir.glob("*.safetensors"))
    for row in rows:
        assert row["sync/adapter"] == 1.0 and 0 < row["sync/bytes"] < model_bytes / 5, row["sync/bytes"]
        assert row["sync/logprob_max_abs_diff"] <= 1e-3 and row["sync/engines_verified"] == 1
        assert row["sync/adapter_effect"] == pytest.approx(1.0, abs=0.05)  # 1 also while B is still 0
    assert rows[-1]["sync/adapter_shift_rms"] > 0  # the adapter has moved the served logprobs
    assert "adapter policy-v3-" in (tmp_path / "adapter" / "server.log").read_text()


def test_lora_sync_adapter_is_refused_where_the_engines_serve_no_adapters(server, tiny_model_dir):
    """model.lora_sync=adapter with engines started without adapters (the session's server): one line."""
    from pipeline.config import Config
    from pipeline.sync.weight_sync import WeightSyncError
    from pipeline.trainer.lora import with_lora

    config = Config()
    config.model.lora_rank = 4
    model = with_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), config)
    sync = WeightSync(
        model,
        0,
        0,
        torch.device("cpu"),
        Engines([server.client.base_url], SERVER_TOKEN),
        host="127.0.0.1",
        timeout_s=60,
        lora_sync="adapter",
    )
    with pytest.raises(
        WeightSyncError, match="model.lora_sync=adapter, but the engines serve no LoRA adapters"
    ):
        sync.connect()
    sync.lora_sync = "auto"  # auto: merged pushes, every weight
    sync.connect()
    assert not sync.adapter_mode and sync.push(1)["verified_bytes_frac"] == 1.0
    sync.close()
