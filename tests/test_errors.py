"""Bad input gives one clear line naming the thing at fault: model folders, engine arguments, requests
(a fuzz test over sampling parameters, prompts and policies), broken weights."""

import json
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lemma import Engine, LemmaError, RaaS, SamplingParams, make_policy


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "Traceback" not in message


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def error_of(fn) -> str:
    with pytest.raises(LemmaError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_model_dir(tmp_path):
    assert error_of(lambda: Engine(tmp_path / "nope")) == f"model directory not found: {tmp_path / 'nope'}"


def test_missing_config(tmp_path):
    assert "config.json is missing" in error_of(lambda: Engine(tmp_path))


def test_unsupported_model_type(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(config))
    message = error_of(lambda: Engine(d))
    assert "unsupported model_type 'gpt2'" in message and "llama, mistral, qwen2, qwen3" in message


def _rewrite_weights(d, edit):
    path = d / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def test_missing_tensor(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    _rewrite_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "tensor model.layers.1.mlp.up_proj.weight is missing" in error_of(lambda: Engine(d))


def test_unexpected_tensor(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    path = _rewrite_weights(d, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}))
    assert error_of(lambda: Engine(d)) == f"{path}: unexpected tensor model.layers.0.extra.weight for model_type llama"


def test_wrongly_shaped_tensor(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    path = _rewrite_weights(d, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    assert error_of(lambda: Engine(d)) == f"{path}: tensor model.norm.weight has shape (7,), expected (64,)"


def test_corrupt_safetensors(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    assert error_of(lambda: Engine(d)).startswith(f"{path}: corrupt or unreadable safetensors file")


@pytest.mark.parametrize("index, expected", [
    ([1], "not a valid safetensors index (needs a 'weight_map')"),
    ({"metadata": {}}, "not a valid safetensors index (needs a 'weight_map')"),
    ({"weight_map": ["model.safetensors"]}, "weight_map: must be a non-empty object of tensor name -> shard file, "
                                            "got ['model.safetensors']"),
    ({"weight_map": {}}, "weight_map: must be a non-empty object of tensor name -> shard file, got {}"),
    ({"weight_map": {"model.norm.weight": 3}}, "weight_map: model.norm.weight must name a .safetensors file in the "
                                               "model folder, got 3"),
    ({"weight_map": {"model.norm.weight": "../other/model.safetensors"}},
     "weight_map: model.norm.weight must name a .safetensors file in the model folder, got '../other/model.safetensors'"),
    ({"weight_map": {"model.norm.weight": "/etc/passwd"}},
     "weight_map: model.norm.weight must name a .safetensors file in the model folder, got '/etc/passwd'"),
    ({"weight_map": {"model.norm.weight": "model-2.safetensors"}}, "names shard model-2.safetensors, which is missing"),
])
def test_bad_safetensors_index_is_one_line_naming_it(tiny_dir, tmp_path, index, expected):
    d = copy_model(tiny_dir, tmp_path / "m")
    path = d / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    assert error_of(lambda: Engine(d)) == f"{path}: {expected}"
    path.write_bytes(b"\xff{")
    assert error_of(lambda: Engine(d)).startswith(f"{path}: not valid JSON")


def test_no_weights(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    assert "no *.safetensors weights found" in error_of(lambda: Engine(d))


def test_missing_tokenizer(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in error_of(lambda: Engine(d))


def test_bad_dtype(tiny_dir):
    assert "unknown dtype 'float8'" in error_of(lambda: Engine(tiny_dir, dtype="float8"))


def test_empty_prompt_and_oversized_request_raise_in_stream_and_chat(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=64)
    assert error_of(lambda: list(engine.stream(""))) == "prompt is empty"
    message = error_of(lambda: list(engine.stream("hello", SamplingParams(max_tokens=100))))
    assert message.startswith("request needs") and "the whole pool holds 64" in message
    assert "lower max_tokens" in message
    assert "prompt is empty" in engine.generate([""], SamplingParams(max_tokens=4))[0].error
    assert engine.pages.all_free


def test_bad_chat_messages(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=64)
    assert "messages[0] must be a dict with 'role' and 'content'" in error_of(lambda: engine.chat([{"text": "hi"}]))


# ---- any input to the Python API: an output or one LemmaError line, the pool whole -------------------

NUMBERS = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=3))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(tiny_dir, kv_cache_tokens=512, max_batch=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    params=st.fixed_dictionaries({}, optional={
        "max_tokens": NUMBERS, "temperature": NUMBERS, "top_k": NUMBERS, "top_p": NUMBERS, "min_p": NUMBERS,
        "repetition_penalty": NUMBERS, "presence_penalty": NUMBERS, "seed": st.one_of(NUMBERS, st.integers(-2**70, 2**70)),
        "stop": st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=2), max_size=2)),
        "ignore_eos": st.one_of(st.booleans(), st.integers(0, 2))}),
    prompt=st.one_of(
        st.text(max_size=20),
        st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
        st.lists(st.one_of(st.integers(-3, 300), st.booleans(), st.none()), max_size=8),
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", 3]),
                                        "content": st.one_of(st.text(max_size=10), st.none(), st.integers())}),
                 min_size=1, max_size=2),
        st.integers(), st.none()),
    policy=st.tuples(st.sampled_from(["dense", "raas", "streaming", "h2o", "quest", "nope"]),
                     st.one_of(st.none(), st.integers(-16, 200), st.sampled_from([32, 48, 64]), st.text(max_size=2))),
)
def test_fuzz_every_outcome_is_an_output_or_one_lemma_error(engine, params, prompt, policy):
    try:
        engine.policy = make_policy(*policy)
        out = engine.generate([prompt], SamplingParams(**{k: v for k, v in params.items() if v is not None}))[0]
        if out.finish_reason == "error":
            assert one_line(out.error)
        else:
            assert out.finish_reason in ("stop", "length") and out.stats.generated_tokens >= 1
    except LemmaError as exc:
        assert one_line(str(exc))
    assert engine.pages.all_free and not engine.has_unfinished()


def test_engine_still_works_after_the_fuzz(engine):
    engine.policy = RaaS(budget=64)
    out = engine.generate(["hello"], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and engine.pages.all_free


@pytest.mark.parametrize("kwargs, fragment", [
    ({"device": "gpu"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ({"device": 3.5}, "device must be"),
    ({"kv_cache_tokens": "1024"}, "kv_cache_tokens must be a positive integer, got '1024'"),
    ({"kv_cache_tokens": True}, "kv_cache_tokens must be a positive integer, got True"),
    ({"kv_cache_tokens": 0}, "kv_cache_tokens must be a positive integer, got 0"),
    ({"kv_cache_tokens": 10**13}, "of memory is free"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1, got 0"),
    ({"max_batch": "2"}, "max_batch must be an integer >= 1"),
    ({"prefill_chunk": 8}, "prefill_chunk must be an integer >= 16, got 8"),
    ({"compile": 1}, "compile must be True, False or a backend name"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"dtype": torch.int8}, "unknown dtype"),
    ({"policy": "raas"}, "policy must be a lemma policy"),
])
def test_engine_arguments(tiny_dir, kwargs, fragment):
    with pytest.raises(LemmaError) as info:
        Engine(tiny_dir, **kwargs)
    assert fragment in str(info.value) and one_line(str(info.value))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu(tiny_dir):
    with pytest.raises(LemmaError, match="this machine has no CUDA GPU"):
        Engine(tiny_dir, device="cuda")


def test_policy_assignment_targets_and_messages_are_checked(engine):
    with pytest.raises(LemmaError, match="policy must be a lemma policy"):
        engine.policy = "raas"
    with pytest.raises(LemmaError, match=r"targets\[0\] token id True is outside the vocabulary"):
        engine.teacher_force(["hi"], [[True, 3]])
    with pytest.raises(LemmaError, match=r"targets\[1\] token id 999999 is outside the vocabulary"):
        engine.teacher_force(["hi", "yo"], [[3], [999999]])
    with pytest.raises(LemmaError, match=r"targets\[0\] must be a non-empty list"):
        engine.teacher_force(["hi"], [[]])
    with pytest.raises(LemmaError, match=r"messages\[0\]: role and content must be strings"):
        engine.chat([{"role": "user", "content": 42}])
    with pytest.raises(LemmaError, match="raas has no option 'budgett'"):
        make_policy("raas", budgett=64)
    outs = engine.generate(["\udcff bad bytes", [True, 2], "fine"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert "cannot be tokenized" in outs[0].error and "outside the vocabulary" in outs[1].error
    assert outs[2].finish_reason == "length" and engine.pages.all_free


def test_non_finite_weights_give_an_error_not_text(tiny_dir):
    broken = Engine(tiny_dir, kv_cache_tokens=512)
    with torch.no_grad():
        broken.model.model.layers[0].mlp.down_proj.weight.fill_(math.nan)
    out = broken.generate(["hello"], SamplingParams(max_tokens=5))[0]
    assert out.finish_reason == "error" and "non-finite logits" in out.error and out.token_ids == []
    assert broken.pages.all_free
