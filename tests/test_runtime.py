import os
import signal

import pytest

from megatron_apriel.config import ConfigError, apply_overrides, from_dict, load_config
from megatron_apriel.runtime import detect_launcher, expand_slurm_nodelist
from megatron_apriel.runtime.stop import StopRequest
from megatron_apriel.training.optimizer import OptimConfig


def test_expand_slurm_nodelist():
    assert expand_slurm_nodelist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_slurm_nodelist("node7") == ["node7"]
    assert expand_slurm_nodelist("a[9-11]b") == ["a9b", "a10b", "a11b"]


def test_detect_launcher():
    assert detect_launcher({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == ("torchrun", 3, 8, 1)
    assert detect_launcher({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}) == ("slurm", 5, 16, 5)
    # an sbatch shell (one task) is not a distributed launch
    assert detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == ("single", 0, 1, 0)
    assert detect_launcher({}) == ("single", 0, 1, 0)


def test_slurm_rendezvous_uses_first_host():
    from megatron_apriel.runtime.distributed import _setup_rendezvous

    env = {"SLURM_JOB_NODELIST": "gpu[012-013]", "SLURM_JOB_ID": "4242"}
    _setup_rendezvous("slurm", env)
    assert env["MASTER_ADDR"] == "gpu012"
    assert env["MASTER_PORT"] == str(20000 + 4242)


def test_world_size_not_divisible_is_a_clear_error(monkeypatch):
    from megatron_apriel.runtime import init_distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 is not divisible by tp\\*pp\\*cp = 2\\*1\\*1"):
        init_distributed(tp=2, device="cpu")


def test_config_overrides_and_coercion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nclip_grad: 1\n")
    cfg = load_config(OptimConfig, path, ["adam_beta2=0.98", "use_distributed_optimizer=false"])
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)
    assert cfg.clip_grad == 1.0 and cfg.adam_beta2 == 0.98 and cfg.use_distributed_optimizer is False


def test_config_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="unknown key learning_rate"):
        load_config(OptimConfig, path)
    with pytest.raises(ConfigError, match="lr: expected a number"):
        from_dict(OptimConfig, {"lr": "fast"})
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["lr"])


def test_stop_request_by_signal_or_stop_file(tmp_path, monkeypatch):
    """Training and GRPO take a stop the same way: a signal to the process, or the stop file."""
    stop_file = tmp_path / "stop"
    monkeypatch.setenv("APRIEL_STOP_FILE", str(stop_file))
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        request = StopRequest((signal.SIGUSR1,))
        assert not request.asked_here()
        stop_file.touch()
        assert request.asked_here() and request.reason() == "stop file"
        stop_file.unlink()
        os.kill(os.getpid(), signal.SIGUSR1)  # the real signal, handled by the request
        assert request.asked_here() and request.reason() == "signal"
        # the world's answer is the reduction's: a rank not asked itself stops when another was
        assert StopRequest(()).any_rank(lambda mine: mine or True) is True
        assert StopRequest(()).any_rank(lambda mine: mine) is False
    finally:
        signal.signal(signal.SIGUSR1, previous)
