"""`shardctl watch`, `pause` and `resume` refuse bad input the way every command does: a message
saying what is wrong and how to fix it, exit 1, never a traceback."""


def test_a_listen_address_without_a_port_is_a_usage_error(fleet):
    result = fleet.cli("watch", "--listen", "localhost")
    assert result.code == 1 and "--listen 'localhost' is not HOST:PORT" in result.err
    assert "Traceback" not in result.both


def test_an_invalid_config_stops_the_daemon_before_it_starts(fleet):
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("shards: 4", "shards: many"))
    result = fleet.cli("watch")
    assert result.code == 1 and "fleet/fleet.yaml:" in result.err and "shards" in result.err
    assert "Traceback" not in result.both


def test_pause_before_any_apply_says_what_to_do(fleet):
    result = fleet.cli("pause")
    assert result.code == 1 and "there is no catalog yet" in result.err and "shardctl apply" in result.err


def test_pause_and_resume_are_recorded_in_the_catalog_and_shown_by_status(applied_fleet):
    assert applied_fleet.cli("pause", "--reason", "incident 42").code == 0
    status = applied_fleet.cli("status")
    assert "Automation: PAUSED by" in status.out and "incident 42" in status.out
    with applied_fleet.catalog() as conn:
        assert conn.execute("SELECT paused, reason FROM shardctl.daemon_control").fetchone() == (True, "incident 42")
    assert applied_fleet.cli("resume").code == 0
    assert "Automation: on" in applied_fleet.cli("status").out
