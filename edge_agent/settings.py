"""Everything one device agent is configured by (TOML [agent], FEDMQ_*, flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_agent.privacy import LocalDP
from fedmq.importspec import DataSpec
from fedmq.link import BrokerAddress, require_credentials
from fedmq.topics import Topics, check_name

ON_DONE = ("auto", "exit", "idle")


@dataclass(frozen=True)
class AgentSettings:
    """One device: who it is, where the broker is, its data and its budget."""

    device_id: str = "device-0"
    job: str = "demo"
    prefix: str = "fedmq"
    host: str = "127.0.0.1"
    port: int = 1883
    mqtt_version: str = "5"
    username: str | None = None
    password: str | None = None
    task: str = "mnist-2nn"
    partition: str = "iid"  # iid | shards | dirichlet | natural (the task's own split)
    num_devices: int = 1  # how many devices share the task's training pool
    device_index: int = 0  # which share is this device's
    alpha: float = 0.5  # Dirichlet concentration for partition = dirichlet
    data_seed: int = 0
    # the device's own data (fedmq/datasources.py): a .npz, a .csv, a folder of class
    # subfolders of images, or module:attr / file.py:attr; "" = the task's bundled pool,
    # shared out by partition/num_devices/device_index (edge_agent/data.py)
    data: DataSpec = DataSpec("")
    eval_data: DataSpec = DataSpec("")  # data to evaluate versions on; "" = a holdout of data
    label_column: str = "label"  # the label column of CSV data
    max_eval_examples: int = 2000  # evaluate each version on at most this many examples
    state_dir: Path = Path("fedmq-agent")
    profile: str = "rpi4"
    max_message_bytes: int = 0  # 0: take the profile's
    torch_threads: int = 0  # 0: take the profile's
    infer_only: bool = False  # never train: fetch the ONNX export and evaluate it
    # readiness gates (edge_agent/readiness.py): where sysfs is ("/" on a device; a test
    # points it at a tree it writes) and how often it is read again
    sysfs_root: Path = Path("/")
    readiness_interval_s: float = 10.0
    extra_delay_s: float = 0.0  # simulated slowness after training (tests, benchmarks)
    # a test/benchmark hook: hold each trained update until <hold_dir>/<device>.release
    # exists (edge_agent/hold.py)
    hold_dir: Path | None = None

    # trust (docs/security.md): TLS files, the aggregator's pinned Ed25519 public key;
    # insecure = plain MQTT, no credentials, unsigned downlink accepted
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_key: Path | None = None
    insecure: bool = False
    # an unsigned manifest more than this many versions ahead of the held one is refused
    # (0: no limit); signed ones are ordered by their epoch and version alone
    max_version_jump: int = 1000

    # local differential privacy (docs/robustness.md): clip the delta to this L2 norm and
    # add N(0, (noise x clip)^2) per coordinate before upload; 0: off
    local_dp_clip: float = 0.0
    local_dp_noise: float = 0.0

    # the operator's side (fedmq/startup.py): how long to wait for a first connection
    # (0: forever), and what to do once the job is done: exit, idle, or auto (trainers
    # exit, inference-only devices keep serving the last version)
    connect_timeout_s: float = 60.0
    on_done: str = "auto"
    # personal models (docs/strategies.md): the fraction of local data held out to evaluate
    # the global and the personal model, in rounds that announce personalisation only
    holdout_fraction: float = 0.2
    # serving (docs/devices.md): the local prediction API on a Unix socket (default
    # <state_dir>/<device>/serving/api.sock), its largest batch and request body
    serve: bool = True
    serve_socket: Path | None = None
    serve_max_batch: int = 256
    serve_max_request_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        check_name("device id", self.device_id)
        require_credentials(self.broker, insecure=self.insecure,
                            bundle="the device's bundle from `fedmq fleet`: --config agent.toml")
        if not self.insecure and self.server_key is None:
            raise ValueError(
                "no server_key: agents pin the aggregator's public key to verify the models "
                "and rounds they receive (server-key.pub.pem in the device's bundle), or "
                "run with --insecure"
            )
        self.topics  # noqa: B018 - validates job and prefix
        self.broker  # noqa: B018
        if self.num_devices < 1 or not 0 <= self.device_index < self.num_devices:
            raise ValueError(
                f"device_index must be in [0, num_devices), got {self.device_index} "
                f"of {self.num_devices}"
            )
        if self.max_message_bytes and self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be 0 (profile's) or at least 1024")
        if self.torch_threads < 0:
            raise ValueError("torch_threads must be 0 (profile's) or positive")
        if self.max_version_jump < 0:
            raise ValueError("max_version_jump must be >= 0 (0: no limit)")
        if self.local_dp_clip < 0 or self.local_dp_noise < 0:
            raise ValueError("local_dp_clip and local_dp_noise must be >= 0")
        if self.local_dp_noise and not self.local_dp_clip:
            raise ValueError("local_dp_noise needs local_dp_clip > 0: noise is scaled to it")
        if self.connect_timeout_s < 0 or self.on_done not in ON_DONE:
            raise ValueError(f"connect_timeout_s must be >= 0 (0: wait forever) and on_done "
                             f"one of {', '.join(ON_DONE)}, got {self.on_done!r}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.max_eval_examples < 1 or not self.label_column:
            raise ValueError("max_eval_examples must be >= 1 and label_column non-empty")
        if not 0.1 <= self.readiness_interval_s <= 3600:
            raise ValueError(f"readiness_interval_s must be in [0.1, 3600] seconds, got "
                             f"{self.readiness_interval_s}")  # fmt: skip
        if self.extra_delay_s < 0 or self.alpha <= 0:
            raise ValueError("extra_delay_s must be >= 0 and alpha positive")
        if self.serve_max_batch < 1 or self.serve_max_request_bytes < 1024:
            raise ValueError("serve_max_batch must be >= 1 and serve_max_request_bytes >= 1024")
        if self.serve and self.serve_socket is not None:  # a default too long: see serving
            from edge_agent.serving_api import check_socket_path

            check_socket_path(self.serve_socket)

    @property
    def serving_socket(self) -> Path:
        """Where the local prediction API listens."""
        return self.serve_socket or self.state_dir / self.device_id / "serving" / "api.sock"

    @property
    def local_dp(self) -> LocalDP | None:
        """Local DP as configured, or None when off."""
        return LocalDP(self.local_dp_clip, self.local_dp_noise) if self.local_dp_clip else None

    @property
    def topics(self) -> Topics:
        return Topics(job=self.job, prefix=self.prefix)

    @property
    def broker(self) -> BrokerAddress:
        return BrokerAddress(
            host=self.host,
            port=self.port,
            mqtt_version=self.mqtt_version,
            username=self.username,
            password=self.password,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
        )
