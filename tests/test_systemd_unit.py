"""systemd/shotsd.service: `systemd-analyze verify` is clean, `systemd-analyze security` rates
it below 2.0, and the real daemon works under the unit's seccomp filters
(SystemCallFilter=, RestrictAddressFamilies=, MemoryDenyWriteExecute=), its credentials
layout and its sd_notify/watchdog settings.

No systemd is needed to run the daemon here: the filters are rebuilt from the unit file with
libseccomp (as systemd does) and installed in the daemon's process before uvloop, asyncpg
and aiohttp are imported, so their imports, their C extensions and the daemon's whole run
happen under them.

This module is also imported by that sandboxed child (see _sandboxed_main), so its top
level imports only the standard library and pytest.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "shotsd.service"
DROPIN_EXAMPLE = ROOT / "systemd" / "tokens.conf.example"
ANALYZE = shutil.which("systemd-analyze")
SANDBOX_ENV = "SHOTSD_TEST_SECCOMP"

needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (Debian: package systemd)")


def unit_settings(path: Path = UNIT) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (no line continuations used)."""
    section, out = "", []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def service_values(key: str) -> list[str]:
    return [v for s, k, v in unit_settings() if s == "Service" and k == key]


def _shotsd_executable() -> str:
    venv_script = Path(sys.executable).parent / "shotsd"
    if venv_script.is_file() and os.access(venv_script, os.X_OK):
        return str(venv_script)
    return shutil.which("shotsd") or sys.executable


def _installable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart*= pointing at an executable that exists here (verify checks),
    and the shipped drop-in example installed as a drop-in next to it."""
    exe = _shotsd_executable()
    text = re.sub(r"(?m)^(Exec\w*=[-+!@:]*)/usr/bin/shotsd\b", rf"\g<1>{exe}",
                  UNIT.read_text())
    assert exe in text
    unit = tmp_path / "shotsd.service"
    unit.write_text(text)
    dropins = tmp_path / "shotsd.service.d"
    dropins.mkdir()
    shutil.copy(DROPIN_EXAMPLE, dropins / "tokens.conf")
    return unit


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "--no-pager", *args], cwd=cwd, capture_output=True,
                          text=True, check=False, timeout=120,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})


# --- systemd-analyze ---------------------------------------------------------------------

@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    unit = _installable_copy(tmp_path)
    done = _analyze("verify", str(unit), cwd=tmp_path)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, output
    # Any line about our unit or its drop-in is a warning (unknown key, bad value, ...).
    ours = [line for line in output.splitlines() if "shotsd" in line or str(tmp_path) in line]
    assert ours == [], output


@needs_analyze
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    unit = _installable_copy(tmp_path)
    done = _analyze("security", "--offline=true", str(unit), cwd=tmp_path)
    output = done.stdout + done.stderr
    found = re.search(r"Overall exposure level for shotsd\.service: (\d+\.\d+) (\w+)", output)
    assert found, output
    exposure, verdict = float(found[1]), found[2]
    # SPEC §9: "OK" or better, i.e. below 2.0. This unit is at 1.1 (network access and no IP
    # allow list are what is left); a change that costs more than that needs a reason.
    assert exposure < 2.0, output
    assert verdict in ("OK", "SAFE"), output
    assert exposure <= 1.2, f"exposure rose to {exposure}; was 1.1\n{output}"


def test_the_unit_says_what_spec_pins() -> None:
    settings = {(s, k): v for s, k, v in unit_settings()}
    assert settings["Service", "Type"] == "notify"
    assert settings["Service", "NotifyAccess"] == "main"
    assert settings["Service", "WatchdogSec"] == "30s"
    assert settings["Service", "Restart"] == "on-failure"
    assert settings["Service", "TimeoutStopSec"] == "15s"  # the drain takes <= 10 s
    assert settings["Service", "ExecStart"] == (
        "/usr/bin/shotsd run --config /etc/shotsd/config.toml")
    assert settings["Service", "User"] == "shotsd"
    assert settings["Service", "MemoryDenyWriteExecute"] == "yes"
    # Secrets arrive as credentials, never through the environment.
    assert "pgpass:/etc/shotsd/credentials/pgpass" in service_values("LoadCredential")
    assert not service_values("EnvironmentFile")
    environment = " ".join(service_values("Environment"))
    assert "PGPASSFILE=%t/shotsd/pgpass" in environment
    assert "/usr/bin/install -m 0600 %d/pgpass %t/shotsd/pgpass" in service_values(
        "ExecStartPre")
    assert "TOKEN" not in environment
    assert "SHOTS_DATABASE_URL" not in environment
    dropin = unit_settings(DROPIN_EXAMPLE)
    assert ("Service", "LoadCredential",
            "shop.token:/etc/shotsd/credentials/shop.token") in dropin


# --- the unit's seccomp filters, rebuilt with libseccomp ------------------------------------

SCMP_ACT_ALLOW = 0x7FFF0000
CMP_EQ, CMP_GT, CMP_MASKED_EQ = 4, 6, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
# systemd lets these through any allow list, so that exec and exit keep working.
ALWAYS_ALLOWED = {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}


def _scmp_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _libseccomp() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp")
    for candidate in filter(None, (name, "libseccomp.so.2")):
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        return lib
    return None


def _expand(names: list[str]) -> set[str]:
    """System call names of `names`, groups (@system-service, ...) expanded by systemd."""
    groups = [n for n in names if n.startswith("@")]
    calls = {n for n in names if not n.startswith("@")}
    while groups:
        assert ANALYZE is not None
        listing = subprocess.run([ANALYZE, "--no-pager", "syscall-filter", *groups],
                                 capture_output=True, text=True, check=True).stdout
        groups = []
        for line in listing.splitlines():
            item = line.strip()
            if not line.startswith(" ") or not item or item.startswith("#"):
                continue
            if item.startswith("@"):
                groups.append(item)
            else:
                calls.add(item)
    return calls


def seccomp_spec() -> dict[str, Any]:
    """What the unit asks of seccomp, resolved to plain system call names and numbers."""
    allowed: set[str] | None = None
    denied: set[str] = set()
    for value in service_values("SystemCallFilter"):
        invert = value.startswith("~")
        names = _expand(value.lstrip("~").split())
        if allowed is None and not invert:
            allowed = names
        elif allowed is None:
            denied |= names
        elif invert:
            allowed -= names
        else:
            allowed |= names
    families = [getattr(socket, name) for value in service_values("RestrictAddressFamilies")
                for name in value.split()]
    error_number = service_values("SystemCallErrorNumber")
    return {
        "allowed": sorted((allowed | ALWAYS_ALLOWED) if allowed is not None else []),
        "denied": sorted(denied),
        "errno": getattr(errno, error_number[-1]) if error_number else None,
        "families": sorted(int(f) for f in families),
        "mdwe": service_values("MemoryDenyWriteExecute")[-1:] == ["yes"],
    }


def install_seccomp(spec: dict[str, Any]) -> None:
    """Installs the filters systemd would (same rules as systemd's seccomp-util.c), in the
    calling process and its future children. The allow list goes last: it denies seccomp()."""
    lib = _libseccomp()
    assert lib is not None

    def add(ctx: int, action: int, name: str, *cmps: _ArgCmp) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # another architecture's name (e.g. _llseek)
            return
        array = (_ArgCmp * max(1, len(cmps)))(*cmps)
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
        assert rc == 0, f"seccomp_rule_add({name}): {rc}"

    def load(ctx: int) -> None:
        rc = lib.seccomp_load(ctx)
        lib.seccomp_release(ctx)
        assert rc == 0, f"seccomp_load: {rc}"

    if spec["families"]:  # RestrictAddressFamilies= allow list: socket() of any other fails
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        refuse = _scmp_errno(errno.EAFNOSUPPORT)
        for family in range(max(spec["families"])):
            if family not in spec["families"]:
                add(ctx, refuse, "socket", _ArgCmp(0, CMP_EQ, family, 0))
        add(ctx, refuse, "socket", _ArgCmp(0, CMP_GT, max(spec["families"]), 0))
        load(ctx)
    if spec["mdwe"]:  # MemoryDenyWriteExecute=
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        refuse = _scmp_errno(errno.EPERM)
        add(ctx, refuse, "mmap", _ArgCmp(2, CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC,
                                         PROT_WRITE | PROT_EXEC))
        add(ctx, refuse, "mprotect", _ArgCmp(2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        add(ctx, refuse, "pkey_mprotect", _ArgCmp(2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        add(ctx, refuse, "shmat", _ArgCmp(2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        load(ctx)
    # SystemCallFilter= with SystemCallErrorNumber= (without it systemd kills the process).
    action = _scmp_errno(spec["errno"]) if spec["errno"] else 0x80000000  # KILL_PROCESS
    if spec["allowed"]:
        ctx = lib.seccomp_init(action)
        for name in spec["allowed"]:
            add(ctx, SCMP_ACT_ALLOW, name)
        load(ctx)
    elif spec["denied"]:
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        for name in spec["denied"]:
            add(ctx, action, name)
        load(ctx)


def _refused(attempt: Any) -> str:
    try:
        attempt()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "allowed"


def _sandboxed_main() -> None:
    """Child process: install the unit's filters, prove they bite, then run ARGV: `shotsd
    ARGS` in this process (uvloop, asyncpg, aiohttp and the daemon are imported only now,
    under the filters), or exec any other command (an ExecStartPre=)."""
    spec = json.loads(os.environ.pop(SANDBOX_ENV))
    install_seccomp(spec)
    if sys.argv[1] != "shotsd":
        os.execv(sys.argv[1], sys.argv[1:])
    probes = {
        "wx_mmap": _refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE
                                              | mmap.PROT_EXEC)),
        "netlink_socket": _refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
        "sched_setaffinity": _refused(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
    }
    print("sandbox " + json.dumps(probes), file=sys.stderr, flush=True)
    from daemon.__main__ import main  # after the filters, on purpose

    sys.exit(main(sys.argv[2:]))


SANDBOXED = [sys.executable, "-c",
             "from tests.test_systemd_unit import _sandboxed_main; _sandboxed_main()"]


def _specifiers(value: str, creds: Path, runtime: Path) -> str:
    return value.replace("%d", str(creds)).replace("%t", str(runtime))


def _credentials_and_runtime(tmp_path: Path, pgpass: str, mode: int) -> tuple[Path, Path]:
    """$CREDENTIALS_DIRECTORY as systemd makes it (a read-only directory of read-only files;
    `mode` 0440 is how newer systemd's ACL-granted credentials look) and %t with the unit's
    RuntimeDirectory=shotsd in it."""
    from tests.conftest import TOKEN  # not at the top: see the module docstring

    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "shop.token").write_text(TOKEN + "\n")
    (creds / "pgpass").write_text(pgpass)
    for item in creds.iterdir():
        item.chmod(mode)
    creds.chmod(0o500)
    runtime = tmp_path / "run"
    (runtime / "shotsd").mkdir(parents=True)
    (runtime / "shotsd").chmod(0o700)
    return creds, runtime


def _exec_start_pre(creds: Path, runtime: Path, env: dict[str, str]) -> None:
    for line in service_values("ExecStartPre"):
        argv = shlex.split(_specifiers(line.lstrip("-+!@:"), creds, runtime))
        done = subprocess.run([*SANDBOXED, *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=False, timeout=30)
        assert done.returncode == 0, f"ExecStartPre={line}: {done.stdout}{done.stderr}"


def _unit_environment(creds: Path, runtime: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SHOTS_DATABASE", "NOTIFY_SOCKET", "WATCHDOG_", "PG"))}
    for assignment in " ".join(service_values("Environment")).split():
        name, _, value = assignment.partition("=")
        env[name] = _specifiers(value, creds, runtime)
    env.update({SANDBOX_ENV: json.dumps(seccomp_spec()), "CREDENTIALS_DIRECTORY": str(creds)})
    return env


def test_the_database_password_reaches_asyncpg_however_systemd_sets_the_mode(
    tmp_path: Path,
) -> None:
    """asyncpg skips a password file with group or other bits, and that is what a credential
    granted by ACL looks like (0440): ExecStartPre= hands asyncpg a 0600 copy."""
    reason = _seccomp_usable()
    if reason:
        pytest.skip(reason)
    from asyncpg import connect_utils  # not at the top: see the module docstring

    creds, runtime = _credentials_and_runtime(
        tmp_path, "db.internal:5432:app:shotsd:s3cret\n", 0o440)
    env = _unit_environment(creds, runtime)
    _exec_start_pre(creds, runtime, env)
    copy = Path(env["PGPASSFILE"])
    assert copy.parent == runtime / "shotsd"
    assert copy.stat().st_mode & 0o777 == 0o600

    def password(passfile: Path) -> str | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found: str | None = connect_utils._read_password_from_pgpass(  # asyncpg's own reader
                passfile=passfile, hosts=["db.internal"], ports=[5432], database="app",
                user="shotsd")
        return found

    assert password(creds / "pgpass") is None  # the credential itself would be ignored
    assert password(copy) == "s3cret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seccomp_usable() -> str | None:
    """Why the filters cannot be installed here, or None."""
    if ANALYZE is None:
        return "systemd-analyze not installed (it resolves the unit's system call groups)"
    if _libseccomp() is None:
        return "libseccomp not installed (Debian: libseccomp2, a dependency of systemd)"
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_systemd_unit import *; "
         "install_seccomp({'allowed': [], 'denied': [], 'errno': None, 'families': [], "
         "'mdwe': True})"], cwd=ROOT, capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"this kernel/container refuses seccomp filters: {probe.stderr.strip()[-300:]}"
    return None


@pytest.mark.asyncio
async def test_the_daemon_runs_under_the_units_seccomp_filters_and_credentials(
    pool: Any, dsn: str, emulator: Any, tmp_path: Path,
) -> None:
    """A shot delivered end to end by `shotsd run` inside the unit's system call filters, with
    its token read from $CREDENTIALS_DIRECTORY as LoadCredential= lays it out, the unit's
    ExecStartPre= and Environment= (PGPASSFILE), sd_notify READY/WATCHDOG/STOPPING, /healthz
    served, and a graceful SIGTERM."""
    reason = _seccomp_usable()
    if reason:
        pytest.skip(reason)
    import aiohttp  # not at the top: see the module docstring

    from tests.conftest import TOKEN, add_contacts, add_shot, shot_row, write_config

    creds, runtime = _credentials_and_runtime(tmp_path, "#\n", 0o400)  # SetCredential=
    port = _free_port()
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url, bots={},
                       metrics={"listen": f"127.0.0.1:{port}"})
    with cfg.open("a") as fh:
        fh.write('[bots.shop]\ntoken_file = "shop.token"\n')

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    env = _unit_environment(creds, runtime)
    _exec_start_pre(creds, runtime, env)
    env.update({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"})

    await add_contacts(pool, "shop", range(1, 21))
    shot = await add_shot(pool)
    proc = await asyncio.create_subprocess_exec(
        *SANDBOXED, "shotsd", "run", "--config", str(cfg), cwd=ROOT, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (row := await shot_row(pool, shot))["finished_at"] is None:
            if proc.returncode is not None:
                out, err = await proc.communicate()
                raise AssertionError(f"the sandboxed daemon exited {proc.returncode}:\n"
                                     f"{err.decode()}\n{out.decode()[-3000:]}")
            assert loop.time() < deadline, "the sandboxed daemon did not finish the shot"
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            health = resp.status
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    messages = []
    while True:
        try:
            messages.append(notify.recv(4096).decode())
        except BlockingIOError:
            break
    notify.close()
    stderr = err.decode()
    assert proc.returncode == 0, stderr + out.decode()[-3000:]
    probes = json.loads(re.search(r"^sandbox (.*)$", stderr, re.M)[1])  # type: ignore[index]
    # The filters were live: W+X memory, netlink sockets and @resources calls were refused.
    assert probes == {"wx_mmap": "EPERM", "netlink_socket": "EAFNOSUPPORT",
                      "sched_setaffinity": "EPERM"}
    assert row["status"] == "sent", dict(row)
    assert row["sent_count"] == 20, dict(row)
    assert len(emulator.delivered()) == 20
    assert health == 200
    assert messages, "no sd_notify message"
    assert messages[0].startswith("READY=1"), messages
    assert "WATCHDOG=1" in messages
    assert any(m.startswith("STOPPING=1") for m in messages), messages
    assert TOKEN not in stderr
    assert TOKEN not in out.decode()
