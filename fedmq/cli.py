"""The `fedmq` command: demo, aggregator, agent, broker, fleet, status, monitor, report, tasks.

Settings come from a TOML file (--config), then FEDMQ_* environment variables, then flags;
a TOML table, key or FEDMQ_* variable that no command knows is an error. Exit codes (every
failure to start is one line on stderr, fedmq/cli_errors.py): 0 done, 1 unexpected failure,
2 bad configuration or usage, 3 the demo ran but missed its accuracy target, 4 no broker could
be reached or started, 5 this host is not ready (a missing optional package, an unusable state
directory, a port in use), 6 another agent with this device id (or another aggregator of
this job) is connected. `fedmq status`: 1 when the job has no status on the broker.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path
from typing import Any

from fedmq import __version__
from fedmq.cli_errors import (  # noqa: F401 - the exit codes are part of this module's API
    EXIT_CODES_HELP,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_IDENTITY_IN_USE,
    EXIT_NO_BROKER,
    EXIT_NOT_READY,
    EXIT_OK,
    EXIT_TARGET_MISSED,
    FatalError,
    missing_package,
)
from fedmq.config import ConfigError, load_settings

AGGREGATOR_HELP = {
    "job": "job name; topics live under <prefix>/<job>/",
    "prefix": "topic prefix (default fedmq)",
    "host": "MQTT broker host",
    "port": "MQTT broker port",
    "mqtt_version": "MQTT protocol: 5 or 3.1.1",
    "username": "broker user name",
    "password": "broker password (prefer FEDMQ_PASSWORD)",
    "task": "built-in task (fedmq tasks) or package.module:attr",
    "state_dir": "directory for global versions, round history and service state",
    "rounds": "rounds to run, 0 = until stopped",
    "target_accuracy": "stop once the global model reaches this accuracy: the central test "
    "set's, else the devices' federated evaluation (0 = never)",
    "eval_data": "central test set: '' = the task's bundled one, 'none' = no central "
    "evaluation (devices evaluate each version), or a file/source in any --data format "
    "(.npz x/y, CSV with a label column, image folders, module:attr)",
    "devices_per_round": "updates that complete a round (0 = every online device)",
    "over_select": "select this fraction more devices than needed, for dropouts",
    "min_devices": "quorum: updates needed to close a round at its deadline",
    "round_timeout_s": "seconds from opening a round to its deadline",
    "start_wait_s": "open a smaller round when the full fleet is not online after this",
    "epochs": "local epochs per round (E)",
    "batch_size": "local batch size (B)",
    "lr": "local SGD learning rate",
    "momentum": "local SGD momentum",
    "server_optimizer": "server optimiser on the round's mean delta: sgd (FedAvg), avgm "
    "(server momentum), adam, yogi or adagrad (Reddi et al. 2021); its state is saved with "
    "each version and resumed after a restart (docs/strategies.md)",
    "server_lr": "server learning rate; 0 = the optimiser's default: sgd 1 (FedAvg), avgm 1, "
    "adam and yogi 0.01, adagrad 0.1 (starting points from Reddi et al.; tune it on your "
    "task)",
    "server_momentum": "beta1: avgm's momentum and the first-moment decay of adam, yogi and "
    "adagrad (0.9, as in Reddi et al.)",
    "server_beta2": "adam and yogi: second-moment decay beta2 (0.99, as in Reddi et al.)",
    "server_tau": "adam, yogi, adagrad: adaptivity tau (epsilon); smaller is more adaptive "
    "(1e-3, Reddi et al.'s recommendation)",
    "prox_mu": "FedProx: devices add mu/2 ||w - w_global||^2 to their local loss, announced "
    "in each round (0 = off, plain FedAvg; try 0.01-1; needs prox_mu x lr < 1)",
    "selection": "device selection: random (uniform, seeded; the default) or utility "
    "(Oort-style: prefers devices with high reported loss x examples and fast round trips, "
    "explores untried ones, never starves one; docs/strategies.md)",
    "selection_exploration": "utility: fraction of each round's picks among never-tried "
    "devices",
    "selection_round_s": "utility: preferred round duration T in seconds; devices slower than "
    "T weigh (T / t)^alpha (0 = the median observed round-trip time)",
    "selection_speed_alpha": "utility: the speed penalty's exponent alpha (0 = ignore speed)",
    "selection_max_skip_rounds": "utility: fairness guard; a device left out this many rounds "
    "in a row is selected next (0 = 4 x online devices / picks per round)",
    "personalization": "personal models on devices, announced in each round: none; "
    "finetune (each device fine-tunes the global model on its own data and keeps it); fedper "
    "(the head stays on devices, only the shared body is averaged) (docs/strategies.md)",
    "personal_steps": "local SGD steps of a device's personal model per round (finetune: from "
    "the global model; fedper: of the head before the body, FedRep; 0: trained together)",
    "personal_head": "fedper: comma-separated tensor names kept on devices; empty = the "
    "task's last layer (mnist-2nn: 4.weight,4.bias)",
    "client_correction": "none or scaffold: SCAFFOLD control variates, announced in each "
    "round; devices send a control delta with every update (twice the upload) and agents "
    "that do not know it are refused (docs/strategies.md)",
    "normalize_local_work": "FedNova: divide each update by the local steps its device "
    "reports and rescale by the example-weighted mean steps, so budget-stopped devices "
    "weigh fairly (false = FedAvg)",
    "seed": "seed for model initialisation and device selection",
    "max_message_bytes": "largest MQTT payload to publish (capped by the broker's CONNACK)",
    "max_update_bytes": "refuse update payloads larger than this",
    "publish_onnx": "publish each global version's ONNX export for inference devices",
    "mode": "sync: rounds with a deadline and quorum; async: FedBuff, a version every K updates",
    "buffer_size": "async: updates folded into each new version (K)",
    "staleness_exponent": "async: an update s versions stale weighs (1 + s)^-a",
    "max_staleness": "async: reject updates more than this many versions stale",
    "codec": "update pipeline devices encode with: [topk:F+](float32|fp16|int8[:B])[+zstd], "
    "e.g. topk:0.1+int8+zstd (~24x fewer bytes), int8+zstd (~6x), float32 (none)",
    "update_budget_bytes": "byte budget of one update; devices send fewer values to meet it "
    "(0 = none)",
    "downlink": "codec of each global version's full payload: float32, fp16 or int8[+zstd]",
    "downlink_delta": "also publish each version as a delta from the previous one in this "
    "codec, e.g. int8+zstd ('' = off)",
    "drop_grace_s": "seconds a device's Will (offline) must stand before it counts as a "
    "dropout: longer than a device takes to reconnect after a broker restart, since Mosquitto "
    "publishes every client's Will when it shuts down",
    "keep_versions": "global versions kept in the state directory, newest first (0 = all)",
    "snapshot_every": "accepted updates between snapshots of the open round's sum (a restart "
    "replays the journal from the last one)",
    "signing_key": "Ed25519 private key (PEM PKCS#8) that signs manifests and rounds; unset: "
    "<state_dir>/signing-key.pem, made once, its public key in signing-key.pub.pem",
    "max_selected": "most devices one round selects (fewer when their ids would not fit one "
    "round message of max_message_bytes)",
    "max_devices": "most devices the aggregator tracks; offline ones give way to new ones, "
    "a new device is refused when all are online (with fleet_file only enrolled ones count)",
    "max_partial_updates_per_device": "chunked updates one device may have half-sent at once; "
    "its oldest gives way, so a device flooding partial updates starves only itself",
    "rule": "aggregation rule: fedavg (weighted mean), median, trimmed_mean, krum (Multi-Krum) "
    "or clip (norm-clipped, unweighted mean; with dp_* central DP); median, trimmed_mean and "
    "krum keep every update of a round in memory (docs/robustness.md)",
    "norm_bound": "fixed L2 bound on an update's delta; larger ones are scaled down to it "
    "(0 = adaptive, see norm_bound_factor)",
    "norm_bound_factor": "adaptive L2 bound: this many times the median norm of the previous "
    "round's accepted updates (0 = no bound; the first round has none unless norm_bound)",
    "max_examples": "cap on the num_examples (FedAvg weight) an update may claim; a device's "
    "max_examples in the fleet file caps it lower",
    "examples_factor": "adaptive example cap: an update may claim at most this many times the "
    "median num_examples claimed in the previous round (0 = off; in round 1 updates weigh "
    "alike)",
    "trim_fraction": "trimmed_mean: fraction of values dropped at each end of every coordinate",
    "krum_f": "krum: Byzantine updates to tolerate per round (set it to the attackers you expect)",
    "krum_m": "krum: updates averaged (1 = Krum, 0 = n - f, Multi-Krum)",
    "clip_norm": "clip: L2 norm C each update is clipped to (0 = the previous round's median "
    "norm; central DP needs a fixed C)",
    "dp_noise_multiplier": "central DP: Gaussian noise of std z x clip_norm on the sum of "
    "clipped updates (needs rule clip; 0 = off)",
    "dp_epsilon": "central DP: derive the noise multiplier that spends this epsilon over "
    "`rounds` rounds (0 = off; or set dp_noise_multiplier)",
    "dp_delta": "central DP: the delta (epsilon, delta) is reported at, in history and status",
    "connect_timeout_s": "give up (exit 4) when no broker answered within this many seconds, "
    "with a progress line at 10, 30 and 60 s (0 = wait forever); a broker lost later is "
    "retried for ever",
    "metrics_port": "serve Prometheus metrics on http://METRICS_HOST:PORT/metrics (0 = off; "
    "docs/metrics.md)",
    "metrics_host": "address the metrics endpoint listens on (0.0.0.0: every interface)",
}

AGENT_HELP = {
    "device_id": "this device's id (letters, digits, _ . -)",
    "job": AGGREGATOR_HELP["job"],
    "prefix": AGGREGATOR_HELP["prefix"],
    "host": AGGREGATOR_HELP["host"],
    "port": AGGREGATOR_HELP["port"],
    "mqtt_version": AGGREGATOR_HELP["mqtt_version"],
    "username": AGGREGATOR_HELP["username"],
    "password": AGGREGATOR_HELP["password"],
    "task": AGGREGATOR_HELP["task"],
    "partition": "how the task's pool is split across devices: iid, shards, dirichlet, or "
    "natural (the task's own split, e.g. plaid-cnn's)",
    "num_devices": "how many devices share the pool",
    "device_index": "which share is this device's (0-based)",
    "alpha": "Dirichlet concentration for --partition dirichlet",
    "data_seed": "seed of the partition (the same on every device)",
    "data": "this device's own data: a .npz (x, y), a .csv with a label column, a folder of "
    "class subfolders of images (needs Pillow), or module:attr / file.py:attr returning (x, y) "
    "or (x, y) batches; '' = its share of the task's bundled pool (--partition, --num-devices, "
    "--device-index) (docs/devices.md)",
    "eval_data": "data to evaluate each new global version on, in any --data format ('' = "
    "hold out --holdout-fraction of --data; inference-only devices evaluate on all of --data)",
    "label_column": "the label column of CSV data",
    "max_eval_examples": "evaluate each global version on at most this many examples (a seeded "
    "sample), to stay within the device's budget",
    "state_dir": "directory for the held model, progress and the outbox",
    "profile": "firmware profile: a bundled name (fedmq tasks) or a TOML file",
    "max_message_bytes": "largest MQTT payload to publish (0 = the profile's)",
    "torch_threads": "CPU threads for local training (0 = the profile's)",
    "infer_only": "never train: fetch each version's ONNX export, verify and serve it (and "
    "evaluate it on --eval-data or --data, if any)",
    "serve": "serve predictions of the current verified model on a local Unix socket "
    "(false: no API; an inference-only device still keeps the verified model for `fedmq "
    "predict`, a training device then exports and serves nothing and needs no onnxruntime)",
    "serve_socket": "the prediction API's Unix socket (default STATE_DIR/DEVICE/serving/api.sock; "
    "at most 100 bytes)",
    "serve_max_batch": "most examples one /predict request may hold",
    "serve_max_request_bytes": "largest /predict request body in bytes",
    "extra_delay_s": "simulated slowness in seconds after training (tests, benchmarks)",
    "sysfs_root": "where the readiness gates read sysfs (thermal zones, batteries): / on a "
    "device; a test points it at a tree of its own (docs/devices.md)",
    "readiness_interval_s": "seconds between readings of the thermal and battery gates (also "
    "read before every training run)",
    "server_key": "the aggregator's Ed25519 public key (PEM): manifests and rounds must be "
    "signed by it",
    "max_version_jump": "refuse an unsigned manifest more than this many versions ahead of the "
    "held one (0 = no limit)",
    "hold_dir": "test/benchmark hook, not for production: after training, keep each update "
    "in the outbox, write HOLD_DIR/<device>.held (JSON: update_id, round_id) and send it only "
    "once HOLD_DIR/<device>.release exists (which it then deletes: the next update is held "
    "again); a release file with JSON {\"up_to_round\": N} lets go only of updates for rounds "
    "up to N",
    "local_dp_clip": "local DP: clip this device's delta to this L2 norm before upload (0 = off)",
    "local_dp_noise": "local DP: add Gaussian noise of std local_dp_noise x local_dp_clip to "
    "every coordinate before upload, for fleets that do not trust the aggregator (0 = none)",
    "connect_timeout_s": AGGREGATOR_HELP["connect_timeout_s"],
    "on_done": "when the aggregator's last round ends: exit (0), idle (keep serving the last "
    "version), or auto: training devices exit, inference-only devices idle",
    "holdout_fraction": "the seeded fraction of this device's data held out (not trained on) to "
    "evaluate each global version (federated evaluation) and its personal model "
    "(docs/strategies.md); unused with --eval-data",
}


@dataclasses.dataclass(frozen=True)
class StatusSettings:
    """Where `fedmq status` looks (TOML [status], FEDMQ_*, flags)."""

    job: str = "demo"
    prefix: str = "fedmq"
    host: str = "127.0.0.1"
    port: int = 8883
    mqtt_version: str = "5"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False
    timeout: float = 5.0

    def __post_init__(self) -> None:
        from fedmq.link import require_credentials

        require_credentials(self.address, insecure=self.insecure, bundle="the operator bundle "
                            "of `fedmq fleet init`: --config bundles/operator.<job>/operator.toml")

    @property
    def address(self) -> Any:
        from fedmq.link import BrokerAddress

        return BrokerAddress(host=self.host, port=self.port, mqtt_version=self.mqtt_version,
                             username=self.username, password=self.password,
                             ca_file=self.ca_file, cert_file=self.cert_file,
                             key_file=self.key_file)  # fmt: skip


STATUS_HELP = {
    **{k: AGGREGATOR_HELP[k] for k in ("job", "prefix", "host", "port", "mqtt_version",
                                        "username", "password")},  # fmt: skip
    "ca_file": "the CA that signed the broker's certificate (TLS)",
    "cert_file": "client certificate (mTLS; CN = the identity)",
    "key_file": "the client certificate's key",
    "insecure": "plain MQTT without TLS or credentials",
    "timeout": "seconds to wait for the broker and the status",
}
TLS_HELP = {k: STATUS_HELP[k] for k in ("ca_file", "cert_file", "key_file")}
AGGREGATOR_HELP.update(TLS_HELP)
AGGREGATOR_HELP.update({
    "fleet_file": "fleet.toml of enrolled devices (fedmq fleet); updates from others are refused",
    "insecure": "plain MQTT without TLS or credentials, for a network you trust",
})
AGENT_HELP.update(TLS_HELP)
AGENT_HELP.update({
    "insecure": "plain MQTT without TLS or credentials, unsigned models accepted",
})


def _add_settings_flags(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        help_text = f"{helps.get(f.name, '')} (default: {f.default})"
        if tp is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )  # fmt: skip
        else:
            base = tp if tp in (int, float, Path) else str
            parser.add_argument(flag, dest=f.name, type=base, default=None, help=help_text)


def _settings(cls: type, args: argparse.Namespace, section: str) -> Any:
    return load_settings(cls, sections=(section,), config_file=args.config, flags=vars(args))


def _setup_logging(level: str) -> None:
    class _Device(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.device = getattr(record, "device", "-")
            return True

    handler = logging.StreamHandler()
    handler.addFilter(_Device())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(device)s] %(message)s")
    )
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from aggregator.settings import AggregatorSettings
    from edge_agent.settings import AgentSettings

    parser = argparse.ArgumentParser(
        prog="fedmq",
        description="Federated learning for fleets of small devices that talk over MQTT.",
        epilog=(
            "Settings: --config FILE (TOML; top-level keys and an [aggregator] or [agent] "
            "table), then FEDMQ_<SETTING> environment variables, then flags; an unknown "
            "table, key or FEDMQ_ variable is an error. " + EXIT_CODES_HELP
        ),
    )
    parser.add_argument("--version", action="version", version=f"fedmq {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="broker + aggregator + a fleet of agents on MNIST, with progress and a plot",
        description=(
            "Start a broker (Mosquitto, or an embedded one when Mosquitto is not installed), "
            "an aggregator and a fleet of agents as separate processes; train until the "
            "target accuracy; write metrics JSON and a plot to the run directory."
        ),
    )
    from fedmq.demo import add_demo_flags

    add_demo_flags(demo)

    agg = sub.add_parser(
        "aggregator",
        help="run the aggregator service for one job",
        description=(
            "Run one job's rounds against an MQTT broker: synchronous FedAvg rounds, or "
            "FedBuff buffers with --mode async. Every accepted update is journalled in "
            "--state-dir before it is acknowledged; a restart resumes where it stopped."
        ),
    )
    agg.add_argument("--config", type=Path, help="TOML config file")
    _add_settings_flags(agg, AggregatorSettings, AGGREGATOR_HELP)

    agent = sub.add_parser(
        "agent",
        help="run a device agent",
        description="Take part in a job: fetch global versions, train locally, send updates.",
    )
    agent.add_argument("--config", type=Path, help="TOML config file")
    _add_settings_flags(agent, AgentSettings, AGENT_HELP)

    fleet = sub.add_parser(
        "fleet",
        help="create and maintain a fleet's certificates, ACL and per-device bundles",
        description=(
            "A fleet directory holds a job's security material: a CA, the broker's "
            "certificate, the aggregator's Ed25519 signing key, an ACL where each device may "
            "publish only its own topics, a CRL, and one bundle per device (its certificate, "
            "key, the CA and the aggregator's public key, with an agent.toml to run it). "
            "Copy bundles/<device>/ to the device and run: fedmq agent --config agent.toml. "
            "See docs/security.md."
        ),
    )
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    init = fleet_sub.add_parser("init", help="create a fleet directory",
                                description="Create a fleet directory with a new CA.")  # fmt: skip
    init.add_argument("dir", type=Path, help="the fleet directory to create")
    init.add_argument("--job", default="demo", help="job name (default demo)")
    init.add_argument("--prefix", default="fedmq", help="topic prefix (default fedmq)")
    init.add_argument("--host", action="append", dest="hosts", metavar="HOST",
                      help="broker host name or address devices connect to, in the broker's "
                      "certificate (repeat for more; default 127.0.0.1 and localhost)")  # fmt: skip
    init.add_argument("--port", type=int, default=8883, help="broker TLS port (default 8883)")
    init.add_argument("--device", action="append", default=[], metavar="ID[:CLASS]",
                      help="enrol a device (repeat); CLASS is its firmware profile")  # fmt: skip
    init.add_argument("--devices", type=int, default=0, metavar="N",
                      help="also enrol device-00 .. device-<N-1>")  # fmt: skip
    add = fleet_sub.add_parser(
        "add", help="enrol a device (or add an operator): issue its certificate and bundle",
        description="Enrol a device, or with --operator issue one more read-only identity "
        "operator.<job>.<NAME> for a person or tool that watches while others do (a "
        "certificate is its MQTT client id: two tools sharing one knock each other off).")
    add.add_argument("dir", type=Path)
    add.add_argument("device", metavar="ID", help="device id, or the operator's NAME "
                     "(letters, digits, _ . -)")  # fmt: skip
    add.add_argument("--operator", action="store_true",
                     help="a read-only operator identity, not a device")  # fmt: skip
    add.add_argument("--class", dest="device_class", default="", help="firmware profile name")
    add.add_argument("--max-examples", type=int, default=None,
                     help="most examples one update from this device may claim")  # fmt: skip
    revoke = fleet_sub.add_parser("revoke", help="revoke a device's (or an added operator's) "
                                  "certificate and access")  # fmt: skip
    revoke.add_argument("dir", type=Path)
    revoke.add_argument("device", metavar="IDENTITY",
                        help="a device id or an added operator's operator.<job>.<name>")
    show = fleet_sub.add_parser("show", help="list a fleet's devices and files")
    show.add_argument("dir", type=Path)

    broker = sub.add_parser(
        "broker",
        help="run a Mosquitto broker with a generated config",
        description=(
            "Run Mosquitto in the foreground with a config fedmq generates: with --fleet DIR, "
            "an mTLS listener that admits only the fleet's certificates and enforces its ACL "
            "(send SIGHUP after fedmq fleet add/revoke); --insecure runs plain MQTT with "
            "anonymous access, for trials on a trusted network only."
        ),
    )
    broker.add_argument("--fleet", type=Path, help="fleet directory (fedmq fleet init)")
    broker.add_argument("--insecure", action="store_true",
                        help="plain MQTT, anonymous access, no ACL")  # fmt: skip
    broker.add_argument("--port", type=int, default=None,
                        help="port to listen on (default: the fleet's, 1883 with --insecure)")
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on")
    broker.add_argument("--data-dir", type=Path, default=Path("fedmq-broker"))
    broker.add_argument("--message-size-limit", type=int, default=0,
                        help="largest payload the broker accepts (0 = its default)")  # fmt: skip
    broker.add_argument("--broker", choices=["auto", "mosquitto", "embedded"], default="auto")

    status = sub.add_parser(
        "status",
        help="print a job's status: phase, model, round, devices",
        description="Read the aggregator's retained status (and with --devices its fleet "
        "mirror) and print a summary, or JSON. On a secured fleet, connect as the read-only "
        "operator: --config <fleet>/bundles/operator.<job>/operator.toml. Exit codes: 0 ok, "
        "1 no status for the job, 2 bad configuration, 4 no broker.",
    )
    status.add_argument("--config", type=Path, help="TOML config file ([status] table)")
    _add_settings_flags(status, StatusSettings, STATUS_HELP)
    status.add_argument("--json", action="store_true", dest="as_json",
                        help="print the status document as JSON (one line per change with "
                        "--watch); with --devices it has a \"fleet\" list")  # fmt: skip
    status.add_argument("--devices", action="store_true",
                        help="add the device table, from the aggregator's fleet mirror")
    status.add_argument("--watch", action="store_true",
                        help="print again on every change until Ctrl-C")  # fmt: skip
    monitor = sub.add_parser(
        "monitor",
        help="a live terminal view of a job: model, round, devices, alerts",
        description="Watch a job in the terminal until Ctrl-C: phase, model version, "
        "accuracy and loss sparklines, the open round device by device, the device table, "
        "counters and alerts (aggregator offline, devices flapping, rejections spiking). "
        "Connection settings as for fedmq status ([status], then [monitor] tables).",
    )
    monitor.add_argument("--config", type=Path,
                         help="TOML config file ([status] and [monitor] tables)")  # fmt: skip
    _add_settings_flags(monitor, StatusSettings, STATUS_HELP)

    report = sub.add_parser(
        "report",
        help="write an HTML report of a run from its state directory",
        description="Read an aggregator's state directory (history.jsonl, state.json, the "
        "ledger) and write one self-contained HTML page: a summary, plots of accuracy, loss, "
        "bytes and participation per round, and a table with a row per round.",
    )
    report.add_argument("state_dir", type=Path, metavar="STATE_DIR",
                        help="the aggregator's --state-dir")  # fmt: skip
    report.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="the HTML file to write (default: STATE_DIR/report.html)")  # fmt: skip

    predict = sub.add_parser(
        "predict", help="run a device's current verified model on a file's inputs",
        description="Predictions of the model a device serves (STATE_DIR/DEVICE/serving/) "
        "for the examples in FILE: .npz (array x), .npy or numeric .csv, one example a row.",
    )  # fmt: skip
    predict.add_argument("file", type=Path, metavar="FILE", help="the inputs")
    predict.add_argument("--state-dir", type=Path, default=Path("fedmq-agent"),
                         help="the agent's state_dir (default: fedmq-agent)")  # fmt: skip
    predict.add_argument("--device", default="device-0", help="the device id (default: device-0)")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("tasks", help="list built-in tasks and firmware profiles")
    from firmware_profiles.cli import add_parser as add_profile_parser

    add_profile_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the fedmq command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return _dispatch(args)
    except FatalError as err:  # the operator can act on it: one line, its exit code
        print(f"fedmq: {err.message}", file=sys.stderr)
        return err.exit_code
    except ImportError as err:
        fatal = missing_package(err)
        if fatal is None:
            raise
        print(f"fedmq: {fatal.message}", file=sys.stderr)
        return fatal.exit_code
    except ConfigError as err:
        print(f"fedmq: configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as err:
        print(f"fedmq: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from fedmq.demo import run_demo

        return run_demo(args)
    if args.command == "aggregator":
        from aggregator.service import Aggregator
        from aggregator.settings import AggregatorSettings
        from fedmq.startup import preflight_aggregator

        settings = _settings(AggregatorSettings, args, "aggregator")
        return _serve(Aggregator(settings=preflight_aggregator(settings)))
    if args.command == "agent":
        from edge_agent.agent import Agent
        from edge_agent.settings import AgentSettings
        from fedmq.startup import preflight_agent

        return _serve(Agent(settings=preflight_agent(_settings(AgentSettings, args, "agent"))))
    if args.command == "broker":
        return _run_broker(args)
    if args.command == "fleet":
        return _fleet(args)
    if args.command == "status":
        return _print_status(args)
    if args.command == "report":
        return _report(args)
    if args.command == "monitor":
        from fedmq.fleetwatch import run_monitor

        return run_monitor(load_settings(StatusSettings, sections=("status", "monitor"),
                                         config_file=args.config, flags=vars(args)))  # fmt: skip
    if args.command == "profile":
        from firmware_profiles.cli import run as run_profile

        return run_profile(args)
    if args.command == "predict":
        from fedmq.predict import run_predict

        return run_predict(args.file, state_dir=args.state_dir, device=args.device,
                           as_json=args.json)  # fmt: skip
    if args.command == "tasks":
        from fedmq.tasks import get_task, list_tasks
        from firmware_profiles import list_profiles, load_profile

        print("tasks:")
        for name in list_tasks():
            print(f"  {name:14s} {get_task(name).description}")
        print("firmware profiles:")
        for name in list_profiles():
            print(f"  {name:14s} {load_profile(name).description}")
        return EXIT_OK
    raise AssertionError(args.command)


def _serve(service: Any) -> int:
    """Run a service until it finishes or SIGTERM/SIGINT asks it to stop."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        return int(service.run(stop=stop))
    except (ConfigError, FatalError):
        raise  # e.g. a state directory of another task (exit 2), no broker (exit 4)
    except ImportError as err:
        if missing_package(err) is None:
            logging.getLogger("fedmq").exception("the service failed")
            return EXIT_FAILURE
        raise
    except Exception:  # exit 2 means configuration only: anything else that escapes is 1
        logging.getLogger("fedmq").exception("the service failed")
        return EXIT_FAILURE


def _report(args: argparse.Namespace) -> int:
    from aggregator.run_report import ReportError, write_run_report

    try:
        out = write_run_report(args.state_dir, args.out)
    except ReportError as err:
        print(f"fedmq report: {err}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {out}")
    return EXIT_OK


def _run_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from broker import start_broker
    from broker.mosquitto import BrokerStartError, log_reason

    if (args.fleet is None) == (not args.insecure):
        print("fedmq: the broker needs --fleet DIR (made by fedmq fleet init) or --insecure",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    port = args.port
    if port is None:
        port = 1883 if args.insecure else _fleet_dir(args.fleet).read().port
    try:
        broker = start_broker(
            prefer=args.broker,
            port=port,
            host=args.host,
            data_dir=args.data_dir,
            message_size_limit=args.message_size_limit,
            fleet_dir=args.fleet,
        )
    except BrokerStartError as err:  # the broker's own reason, one line
        print(f"fedmq: {err.summary}", file=sys.stderr)
        return EXIT_NOT_READY if err.port_in_use else EXIT_NO_BROKER
    except RuntimeError as err:
        print(f"fedmq: {err}", file=sys.stderr)
        return EXIT_NO_BROKER
    print(f"{broker.kind} listening on {broker.host}:{broker.port} (MQTT {broker.mqtt_version})")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if not broker.running:
                print(f"fedmq: the broker exited: {log_reason(broker.log_tail(5))}",
                      file=sys.stderr)  # fmt: skip
                return EXIT_FAILURE
    finally:
        broker.stop()
    return EXIT_OK


def _fleet_dir(path: Path) -> Any:
    from broker.provision import FleetDir

    fleet = FleetDir(path)
    if not fleet.fleet_file.exists():
        raise ConfigError(f"{path} holds no fleet (no fleet.toml): run fedmq fleet init {path}")
    return fleet


def _fleet(args: argparse.Namespace) -> int:
    from broker.provision import FleetDir, aggregator_identity, operator_identity

    if args.fleet_command == "init":
        devices = [tuple(d.split(":", 1)) if ":" in d else d for d in args.device]
        devices += [f"device-{i:02d}" for i in range(args.devices)]
        fleet = FleetDir.init(args.dir, job=args.job, prefix=args.prefix,
                              hosts=args.hosts or ("127.0.0.1", "localhost"), port=args.port,
                              devices=devices)  # fmt: skip
        info = fleet.read()
        print(f"fleet {info.job!r}: {len(info.devices)} devices in {args.dir}")
        print(f"  broker:     fedmq broker --fleet {args.dir}")
        print(f"  aggregator: fedmq aggregator --config "
              f"{fleet.bundle(aggregator_identity(info.job)).root / 'aggregator.toml'}")
        print(f"  a device:   copy {args.dir / 'bundles' / '<device>'} to it; "
              "fedmq agent --config agent.toml")
        return EXIT_OK
    fleet = _fleet_dir(args.dir)
    if args.fleet_command == "add" and args.operator:
        bundle = fleet.add_operator(args.device)
        print(f"operator {bundle.root.name}: bundle in {bundle.root}; send the broker SIGHUP "
              f"to reload its ACL; then fedmq monitor --config {bundle.root / 'operator.toml'}")
    elif args.fleet_command == "add":
        bundle = fleet.add(args.device, device_class=args.device_class,
                           max_examples=args.max_examples)  # fmt: skip
        print(f"enrolled {args.device}: bundle in {bundle.root}; "
              "send the broker SIGHUP to reload its ACL")
    elif args.fleet_command == "revoke":
        fleet.revoke(args.device)
        print(f"revoked {args.device}: its ACL entries are gone once the broker reloads "
              "(SIGHUP); its certificate is refused from the broker's next start (CRL)")
    else:
        info = fleet.read()
        print(f"job {info.job!r} prefix {info.prefix!r} broker {info.host}:{info.port}")
        print(f"identities: {aggregator_identity(info.job)}, {operator_identity(info.job)}")
        for d in (*info.operators.values(), *info.devices.values()):
            state = "revoked" if d.revoked else "enrolled"
            print(f"  {d.id:24s} {state:8s} {d.device_class or '-'}")
    return EXIT_OK


def _print_status(args: argparse.Namespace) -> int:
    from fedmq.fleetwatch import run_status

    return run_status(_settings(StatusSettings, args, "status"), as_json=args.as_json,
                      devices=args.devices, watch=args.watch)  # fmt: skip
