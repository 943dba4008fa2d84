"""A fleet's security material: CA, certificates, CRL, ACL and one bundle per identity.

`fedmq fleet init DIR` makes a fleet directory; `fedmq fleet add/revoke` maintain it. All
key material is made with `cryptography` (ECDSA P-256 for TLS: cheap handshakes on a
Raspberry Pi; Ed25519 for the aggregator's downlink signatures)::

    DIR/fleet.toml                 job, prefix, broker address, enrolled devices
    DIR/ca/ca.crt, ca.key          the fleet's CA (ca.key never leaves this directory)
    DIR/ca/crl.pem                 revoked client certificates
    DIR/broker/                    server.crt/.key, acl (one block per identity)
    DIR/signing/                   the aggregator's Ed25519 key pair
    DIR/bundles/<identity>/        what one machine needs: ca.crt, client.crt, client.key,
                                   the aggregator's public key and a TOML config

Identities are certificate common names, which Mosquitto uses as user names
(`use_identity_as_username`) and client ids (`use_username_as_clientid`): a device is its
id; the aggregator is `aggregator.<job>`, the read-only operator `operator.<job>`. Adding a
device issues one certificate and rewrites the ACL (Mosquitto reloads it on SIGHUP, no
restart); revoking one drops its ACL block at once and adds its serial to the CRL, which
Mosquitto reads at start: until then the revoked device can connect but neither publish
nor subscribe to anything.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmq.fleetfile import DeviceEntry, FleetFile, read_fleet
from fedmq.link import BrokerAddress
from fedmq.signing import create_key
from fedmq.topics import Topics, check_name

FLEET_FILE = "fleet.toml"
CERT_DAYS = 3650  # devices live for years in the field; revoke instead of waiting for expiry
RESERVED_PREFIXES = ("aggregator.", "operator.")


def aggregator_identity(job: str) -> str:
    """The aggregator's certificate common name (and MQTT user name) for a job."""
    return f"aggregator.{job}"


def operator_identity(job: str, name: str = "") -> str:
    """A read-only operator's common name: `operator.<job>` (`fedmq status`, monitors,
    tests' watchers), or `operator.<job>.<name>` for one more person or tool watching at
    the same time (`fedmq fleet add DIR NAME --operator`)."""
    return f"operator.{job}.{check_name('operator name', name)}" if name else f"operator.{job}"


@dataclass(frozen=True)
class Bundle:
    """The files one identity connects with."""

    root: Path

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"

    @property
    def cert_file(self) -> Path:
        return self.root / "client.crt"

    @property
    def key_file(self) -> Path:
        return self.root / "client.key"

    @property
    def server_key(self) -> Path:
        """The aggregator's Ed25519 public key that agents pin."""
        return self.root / "server-key.pub.pem"

    def address(self, host: str, port: int, mqtt_version: str = "5") -> BrokerAddress:
        return BrokerAddress(host=host, port=port, mqtt_version=mqtt_version,
                             ca_file=self.ca_file, cert_file=self.cert_file,
                             key_file=self.key_file)  # fmt: skip


class FleetDir:
    """One job's fleet directory (see the module docstring for its layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------ paths

    @property
    def fleet_file(self) -> Path:
        return self.root / FLEET_FILE

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "ca" / "crl.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "broker" / "server.crt"

    @property
    def server_key_file(self) -> Path:
        return self.root / "broker" / "server.key"

    @property
    def acl(self) -> Path:
        return self.root / "broker" / "acl"

    @property
    def signing_key(self) -> Path:
        return self.root / "signing" / "signing-key.pem"

    @property
    def signing_pub(self) -> Path:
        return self.root / "signing" / "signing-key.pub.pem"

    def bundle(self, identity: str) -> Bundle:
        return Bundle(self.root / "bundles" / identity)

    def read(self) -> FleetFile:
        return read_fleet(self.fleet_file)

    @property
    def aggregator(self) -> Bundle:
        return self.bundle(aggregator_identity(self.read().job))

    @property
    def operator(self) -> Bundle:
        return self.bundle(operator_identity(self.read().job))

    # ------------------------------------------------------------ making

    @classmethod
    def init(
        cls,
        root: Path,
        *,
        job: str,
        prefix: str = "fedmq",
        hosts: Iterable[str] = ("127.0.0.1", "localhost"),
        port: int = 8883,
        devices: Iterable[str | tuple[str, str]] = (),
    ) -> FleetDir:
        """Create a fleet: CA, broker certificate, signing key, aggregator/operator bundles
        and one bundle per device. Refuses a directory that already holds a fleet."""
        fleet = cls(root)
        if fleet.fleet_file.exists():
            raise ValueError(f"{fleet.fleet_file} exists: this directory already holds a fleet")
        Topics(job=job, prefix=prefix)  # validates both
        hosts = list(hosts)
        if not hosts:
            raise ValueError("at least one broker host name or address is needed")
        if not 0 < port < 65536:
            raise ValueError(f"port must be 1-65535, got {port}")
        entries = [_entry(d) for d in devices]
        fleet.root.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedmq CA {job}")])
        now = _now()
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        _write_key(fleet.ca_key, ca_key)
        _write(fleet.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        server_key = ec.generate_private_key(ec.SECP256R1())
        _write_key(fleet.server_key_file, server_key)
        _write(fleet.server_cert, fleet._issue(server_key, "fedmq broker", server_hosts=hosts)
               .public_bytes(serialization.Encoding.PEM))  # fmt: skip
        create_key(fleet.signing_key, fleet.signing_pub)
        fleet._save(FleetFile(job=job, prefix=prefix, host=hosts[0], port=port, devices={}))
        for identity in (aggregator_identity(job), operator_identity(job)):
            fleet._make_bundle(identity)
        for entry in entries:
            fleet._enrol(entry)
        fleet.write_crl()
        fleet.write_acl()
        return fleet

    def add(self, device: str, *, device_class: str = "",
            max_examples: int | None = None) -> Bundle:  # fmt: skip
        """Enrol a device: issue its certificate and bundle, grant it its topics in the ACL.
        Nobody else's certificate changes."""
        bundle = self._enrol(_entry((device, device_class), max_examples))
        self.write_acl()
        return bundle

    def add_operator(self, name: str) -> Bundle:
        """Issue one more read-only identity, operator.<job>.<name>, with its bundle
        (operator.toml for fedmq status and monitor); nobody else's certificate changes."""
        fleet = self.read()
        identity = operator_identity(fleet.job, name)
        if identity in fleet.operators:
            raise ValueError(f"operator {identity!r} is already in {self.fleet_file}")
        bundle, serial = self._make_bundle(identity)
        operators = {**fleet.operators, identity: DeviceEntry(id=identity, serial=serial)}
        self._save(replace(fleet, operators=operators))
        self.write_acl()
        return bundle

    def revoke(self, identity: str) -> None:
        """Revoke a device (or an added operator): its ACL block goes at once, its
        certificate serial into the CRL."""
        fleet = self.read()
        table = fleet.operators if identity in fleet.operators else fleet.devices
        entry = table.get(identity)
        if entry is None:
            raise ValueError(f"{identity!r} is neither an enrolled device nor an added operator "
                             f"in {self.fleet_file}")  # fmt: skip
        changed = {**table, identity: replace(entry, revoked=True)}
        if table is fleet.operators:
            self._save(replace(fleet, operators=changed))
        else:
            self._save(replace(fleet, devices=changed))
        shutil.rmtree(self.bundle(identity).root, ignore_errors=True)
        self.write_crl()
        self.write_acl()

    def write_acl(self) -> None:
        """The broker's ACL: the aggregator's topics, the operator's reads, each enrolled and
        unrevoked device's own topics. Identities not listed may do nothing at all."""
        fleet = self.read()
        t = Topics(job=fleet.job, prefix=fleet.prefix)
        lines = ["# generated by fedmq fleet from fleet.toml; edits are overwritten", "",
                 f"user {aggregator_identity(fleet.job)}",
                 f"topic read {t.updates_filter()}",
                 f"topic read {t.device_states_filter()}",
                 f"topic read {t.metrics_filter()}",
                 f"topic readwrite {t.global_manifest()}",
                 f"topic readwrite {t.global_chunks_filter()}",
                 f"topic readwrite {t.round()}",
                 f"topic readwrite {t.status()}",
                 f"topic write {t.acks_filter()}",
                 f"topic write {t.fleet_filter()}", ""]  # fmt: skip
        operators = [operator_identity(fleet.job)]
        operators += [o.id for o in fleet.operators.values() if not o.revoked]
        for operator in operators:
            lines += [f"user {operator}",
                      f"topic read {t.base}/#",
                      f"topic read {t.device_states_filter()}", ""]  # fmt: skip
        for entry in fleet.devices.values():
            if entry.revoked:
                continue
            d = entry.id
            lines += [f"user {d}",
                      f"topic write {t.update(d)}",
                      f"topic readwrite {t.device_state(d)}",
                      f"topic write {t.metrics(d)}",
                      f"topic read {t.global_manifest()}",
                      f"topic read {t.global_chunks_filter()}",
                      f"topic read {t.round()}",
                      f"topic read {t.ack(d)}", ""]  # fmt: skip
        _write(self.acl, "\n".join(lines).encode())

    def write_crl(self) -> None:
        """The CRL of every revoked device's certificate, signed by the CA."""
        ca_key = _load_private(self.ca_key)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        now = _now()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(now + dt.timedelta(days=CERT_DAYS)))  # fmt: skip
        fleet = self.read()
        for entry in (*fleet.devices.values(), *fleet.operators.values()):
            if entry.revoked and entry.serial is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(entry.serial)
                    .revocation_date(now).build())  # fmt: skip
        crl = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        _write(self.crl, crl.public_bytes(serialization.Encoding.PEM))

    def broker_lines(self) -> tuple[str, ...]:
        """mosquitto.conf lines for an mTLS listener that admits only this fleet's identities
        (listener-level options: they follow the `listener` line)."""
        return (f"cafile {self.ca_cert.resolve()}",
                f"certfile {self.server_cert.resolve()}",
                f"keyfile {self.server_key_file.resolve()}",
                f"crlfile {self.crl.resolve()}",
                "require_certificate true",
                "use_identity_as_username true")  # fmt: skip

    # ------------------------------------------------------------ internals

    def _enrol(self, entry: DeviceEntry) -> Bundle:
        fleet = self.read()
        if entry.id in fleet.devices:
            state = "revoked" if fleet.devices[entry.id].revoked else "enrolled"
            raise ValueError(f"device {entry.id!r} is already {state} in {self.fleet_file}")
        bundle, serial = self._make_bundle(entry.id)
        devices = dict(fleet.devices)
        devices[entry.id] = DeviceEntry(id=entry.id, device_class=entry.device_class,
                                        max_examples=entry.max_examples, serial=serial)  # fmt: skip
        self._save(replace(fleet, devices=devices))
        return bundle

    def _make_bundle(self, identity: str) -> tuple[Bundle, int]:
        fleet = self.read()
        bundle = self.bundle(identity)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(key, identity)
        _write_key(bundle.key_file, key)
        _write(bundle.cert_file, cert.public_bytes(serialization.Encoding.PEM))
        shutil.copyfile(self.ca_cert, bundle.ca_file)
        common = {"job": fleet.job, "prefix": fleet.prefix, "host": fleet.host,
                  "port": fleet.port, "ca_file": "ca.crt", "cert_file": "client.crt",
                  "key_file": "client.key"}  # fmt: skip
        if identity == aggregator_identity(fleet.job):
            shutil.copyfile(self.signing_key, bundle.root / "signing-key.pem")
            os.chmod(bundle.root / "signing-key.pem", 0o600)
            section = {**common, "signing_key": "signing-key.pem",
                       "fleet_file": str(self.fleet_file.resolve())}
            _write(bundle.root / "aggregator.toml", _toml("aggregator", section, "aggregator"))
        elif identity.startswith(operator_identity(fleet.job)):
            _write(bundle.root / "operator.toml", _toml("status", common, "status"))
        else:
            shutil.copyfile(self.signing_pub, bundle.server_key)
            section = {"device_id": identity, **common, "server_key": bundle.server_key.name}
            _write(bundle.root / "agent.toml", _toml("agent", section, "agent"))
        return bundle, cert.serial_number

    def _issue(self, key: ec.EllipticCurvePrivateKey, name: str, *,
               server_hosts: list[str] | None = None) -> x509.Certificate:  # fmt: skip
        ca_key = _load_private(self.ca_key)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        now = _now()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )  # fmt: skip
        if server_hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in server_hosts]), critical=False)
        return builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]

    def _save(self, fleet: FleetFile) -> None:
        lines = ["# the fleet of one fedmq job; maintained by `fedmq fleet`",
                 f"job = {_q(fleet.job)}", f"prefix = {_q(fleet.prefix)}", "",
                 "[broker]", f"host = {_q(fleet.host)}", f"port = {fleet.port}"]  # fmt: skip
        for e in fleet.devices.values():
            lines += ["", "[[device]]", f"id = {_q(e.id)}"]
            if e.device_class:
                lines.append(f"class = {_q(e.device_class)}")
            if e.max_examples is not None:
                lines.append(f"max_examples = {e.max_examples}")
            if e.serial is not None:
                lines.append(f"serial = {e.serial}")
            if e.revoked:
                lines.append("revoked = true")
        for o in fleet.operators.values():
            lines += ["", "[[operator]]", f"id = {_q(o.id)}", f"serial = {o.serial}"]
            if o.revoked:
                lines.append("revoked = true")
        _write(self.fleet_file, ("\n".join(lines) + "\n").encode())


def _entry(device: str | tuple[str, str], max_examples: int | None = None) -> DeviceEntry:
    device_id, device_class = (device, "") if isinstance(device, str) else device
    check_name("device id", device_id)
    if device_id in (".", "..") or device_id.startswith(RESERVED_PREFIXES):
        raise ValueError(f"device id {device_id!r} is reserved")
    return DeviceEntry(id=device_id, device_class=device_class, max_examples=max_examples)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _q(text: str) -> str:
    return json.dumps(text)  # a TOML basic string for the ASCII names fedmq allows


def _toml(section: str, values: dict[str, object], command: str) -> bytes:
    body = "\n".join(f"{k} = {_q(v) if isinstance(v, str) else v}" for k, v in values.items())
    return (f"# generated by fedmq fleet; run: fedmq {command} --config <this file>\n"
            f"[{section}]\n{body}\n").encode()  # fmt: skip


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _load_private(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not the fleet's CA key")
    return key


def credential_flags(fleet: FleetDir | None, identity: str) -> list[str]:
    """Command-line flags that make a fedmq process connect as identity (a device id, or
    aggregator_identity(job)); ["--insecure"] without a fleet."""
    if fleet is None:
        return ["--insecure"]
    bundle = fleet.bundle(identity)
    flags = ["--ca-file", str(bundle.ca_file), "--cert-file", str(bundle.cert_file),
             "--key-file", str(bundle.key_file)]  # fmt: skip
    if identity == aggregator_identity(fleet.read().job):
        return [*flags, "--signing-key", str(fleet.signing_key),
                "--fleet-file", str(fleet.fleet_file)]  # fmt: skip
    return [*flags, "--server-key", str(fleet.signing_pub)]
