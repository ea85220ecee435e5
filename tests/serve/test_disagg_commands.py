"""The two commands reading a disaggregated YAML reject a bad one the same way, before any
server or MPI start: exit code 2 and one line naming the problem."""
import pytest

from tensorrt_llm_dwdp.cli import main


@pytest.mark.parametrize("command", ["disaggregated", "disaggregated_mpi_worker"])
def test_bad_disagg_yaml_exits_2_naming_the_key(command, tmp_path, capsys):
    cfg = tmp_path / "disagg.yaml"
    cfg.write_text("hostname: localhost\nport: 99999\ncontext_servers: {num_instances: 1, urls: "
                   "['localhost:8001']}\ngeneration_servers: {num_instances: 1, urls: "
                   "['localhost:8002']}\n")
    assert main([command, "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "port" in err and "99999" in err, err
