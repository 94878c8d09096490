"""Run Triton's ``perf_analyzer`` on this machine (Debian 12, glibc 2.36).

How it is made to run
---------------------
``pip install perf-analyzer`` on Debian 12 resolves to an empty 0.1.0
placeholder. The real wheel (2.60.0) is tagged ``manylinux_2_38`` and its
binary needs glibc >= 2.38 and ``GLIBCXX_3.4.32``. ``ensure_perf_analyzer()``
does, once, under ``.cache/perf_analyzer/`` (git-ignored by its own
``.gitignore``; override with ``AIOS_PERF_ANALYZER_CACHE``), holding a file lock:

1. ``python -m pip download --no-deps --only-binary=:all: --platform
   manylinux_2_38_x86_64 --python-version 3.11 perf-analyzer==2.60.0`` and
   unzip ``perf_analyzer/bin/perf_analyzer`` from the wheel.
2. If ``perf_analyzer --version`` runs directly (glibc >= 2.38 hosts, e.g.
   Debian 13), the prefix is just the binary.
3. Otherwise fetch Debian 13 (trixie) ``libc6``, ``libstdc++6`` and
   ``libgcc-s1`` with ``apt-get download`` under a *private* apt
   configuration (own sources.list pointing at trixie on the mirror host of
   /etc/apt/sources.list*, own lists/cache/status dirs, empty apt.conf.d so
   no system hooks run; the system's apt state is never touched), unpack
   them with ``dpkg-deb -x`` into ``sysroot-trixie/`` (nothing is
   installed), and start the binary through that folder's loader::

       sysroot-trixie/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
           --library-path sysroot-trixie/usr/lib/x86_64-linux-gnu perf_analyzer ...

   (libssl, libcrypto and libz still come from the host.)

``AIOS_PERF_ANALYZER_BIN=/path/to/perf_analyzer`` skips all of this.
Failure to obtain a runnable binary raises ``PerfAnalyzerUnavailable(reason)``.

Measuring
---------
``run_perf_analyzer(url, model, concurrency, measurement_ms)`` runs
``perf_analyzer -i grpc -u host:port -m model --concurrency-range N
-p measurement_ms -s 100 -r 10 -f report.csv`` (time windows; stability 100 %
because on 2 shared cores the default 10 % never settles), parses the CSV and
returns throughput (infer/s), p50/p90/p95/p99 and average latency (µs), the
raw CSV row and the load generator's CPU use. A run takes at least 3 windows
(perf_analyzer needs 3 in a row within the stability bound), i.e. about
``3 * measurement_ms`` plus ~0.2 s of start-up. Pin the client with ``cpu="1"``
(runs it under ``taskset -c 1``).

CLI::

    python -m bench.perf_analyzer ensure
    python -m bench.perf_analyzer run --url 127.0.0.1:8001 --model tiny_mlp \
        --concurrency 1 16 --measurement-ms 2000 [--cpu 1] [--shape INPUT0:16] [-- extra args]
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

PERF_ANALYZER_VERSION = "2.60.0"
WHEEL_PLATFORM = "manylinux_2_38_x86_64"
TRIXIE_PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRINGS = (
    "/usr/share/keyrings/debian-archive-keyring.gpg",
    "/usr/share/keyrings/debian-archive-trixie-stable.gpg",
)
REPO_ROOT = Path(__file__).resolve().parents[1]

_prefix_cache: list[str] | None = None
_prefix_lock = threading.Lock()


class PerfAnalyzerUnavailable(RuntimeError):
    """perf_analyzer cannot be made to start here; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer started but the measurement failed (unstable, server error, ...)."""


def cache_dir() -> Path:
    return Path(os.environ.get("AIOS_PERF_ANALYZER_CACHE") or REPO_ROOT / ".cache" / "perf_analyzer")


def _log(message: str) -> None:
    print(f"perf_analyzer: {message}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kwargs)


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _works(prefix: list[str]) -> tuple[bool, str]:
    """True if ``prefix --version`` runs and prints perf_analyzer's banner."""
    try:
        proc = _run(prefix + ["--version"], timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    output = proc.stdout + proc.stderr
    return proc.returncode == 0 and "Perf Analyzer" in output, _tail(output, 4)


# --- step 1: the wheel ---------------------------------------------------------------
def _binary(root: Path) -> Path:
    binary = root / f"perf_analyzer-{PERF_ANALYZER_VERSION}" / "perf_analyzer"
    if binary.exists():
        return binary
    wheel_dir = root / "wheel"
    wheels = sorted(wheel_dir.glob(f"perf_analyzer-{PERF_ANALYZER_VERSION}-*.whl"))
    if not wheels:
        _log(f"downloading the perf-analyzer {PERF_ANALYZER_VERSION} wheel ({WHEEL_PLATFORM}) with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", WHEEL_PLATFORM, "--python-version", "3.11",
               f"perf-analyzer=={PERF_ANALYZER_VERSION}", "-d", str(wheel_dir), "--quiet"]
        try:
            proc = _run(cmd)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PerfAnalyzerUnavailable(f"pip download failed: {exc}") from exc
        wheels = sorted(wheel_dir.glob(f"perf_analyzer-{PERF_ANALYZER_VERSION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise PerfAnalyzerUnavailable(
                f"pip download of perf-analyzer=={PERF_ANALYZER_VERSION} failed: {_tail(proc.stderr or proc.stdout)}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(binary.name + ".tmp")
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel, open(tmp, "wb") as out:
            shutil.copyfileobj(wheel.open("perf_analyzer/bin/perf_analyzer"), out)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise PerfAnalyzerUnavailable(f"{wheels[-1].name} holds no perf_analyzer/bin/perf_analyzer: {exc}") from exc
    tmp.chmod(0o755)
    tmp.replace(binary)
    return binary


# --- step 3: a private trixie sysroot ---------------------------------------------------
def _debian_mirror() -> str:
    """The Debian (non-security) mirror this machine's apt uses, else deb.debian.org."""
    if os.environ.get("AIOS_DEBIAN_MIRROR"):
        return os.environ["AIOS_DEBIAN_MIRROR"].rstrip("/")
    files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*"))
    for name in files:
        try:
            text = Path(name).read_text(errors="replace")
        except OSError:
            continue
        uris = re.findall(r"^\s*URIs:\s*(.+)$", text, re.M | re.I)
        uris = [u for line in uris for u in line.split()]
        uris += re.findall(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M)
        for uri in uris:
            uri = uri.rstrip("/")
            if uri.startswith(("http://", "https://")) and uri.endswith("/debian") and "security" not in uri:
                return uri
    return DEFAULT_MIRROR


def _loader(sysroot: Path) -> tuple[Path, list[Path]] | None:
    libdirs = [d for d in (sysroot / "usr/lib/x86_64-linux-gnu", sysroot / "lib/x86_64-linux-gnu") if d.is_dir()]
    for candidate in [d / "ld-linux-x86-64.so.2" for d in libdirs] + [sysroot / "usr/lib64/ld-linux-x86-64.so.2",
                                                                       sysroot / "lib64/ld-linux-x86-64.so.2"]:
        if candidate.exists():
            return candidate, libdirs
    return None


def _trixie_sysroot(root: Path) -> Path:
    sysroot = root / "sysroot-trixie"
    if (sysroot / ".complete").exists():
        return sysroot
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise PerfAnalyzerUnavailable(
                f"host glibc is too old for perf_analyzer {PERF_ANALYZER_VERSION} (needs >= 2.38) and "
                f"'{tool}' is missing, so Debian 13's libc cannot be fetched")
    keyring = next((k for k in KEYRINGS if os.path.exists(k)), None)
    if keyring is None:
        raise PerfAnalyzerUnavailable("no Debian archive keyring to verify Debian 13 (trixie) packages")
    mirror = _debian_mirror()
    apt = root / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "etc/apt.conf.d", "etc/sources.list.d",
                "etc/preferences.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "etc/sources.list").write_text(f"deb [signed-by={keyring}] {mirror} trixie main\n")
    (apt / "status").touch()
    options = {
        "Dir::Etc::SourceList": apt / "etc/sources.list",
        "Dir::Etc::SourceParts": apt / "etc/sources.list.d",
        "Dir::Etc::Parts": apt / "etc/apt.conf.d",
        "Dir::Etc::Preferences": apt / "etc/preferences",
        "Dir::Etc::PreferencesParts": apt / "etc/preferences.d",
        "Dir::State::Lists": apt / "lists",
        "Dir::State::status": apt / "status",
        "Dir::Cache": apt / "cache",
        "Dir::Cache::pkgcache": "",
        "Dir::Cache::srcpkgcache": "",
        "Acquire::Languages": "none",
        "Debug::NoLocking": "1",
    }
    if os.geteuid() == 0:
        options["APT::Sandbox::User"] = "root"  # the private dirs need not be readable by _apt
    apt_opts = [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]
    _log(f"fetching Debian 13 (trixie) {' '.join(TRIXIE_PACKAGES)} from {mirror} (private apt state in {apt})")
    try:
        proc = _run(["apt-get", *apt_opts, "update"], timeout=300)
        if proc.returncode != 0 or re.search(r"^(E:|W: Failed)", proc.stdout + proc.stderr, re.M):
            raise PerfAnalyzerUnavailable(
                f"apt-get update for trixie at {mirror} failed: {_tail(proc.stderr or proc.stdout)}")
        debs = root / "debs"
        shutil.rmtree(debs, ignore_errors=True)
        debs.mkdir()
        proc = _run(["apt-get", *apt_opts, "download", *TRIXIE_PACKAGES], timeout=300, cwd=debs)
        files = sorted(debs.glob("*.deb"))
        if proc.returncode != 0 or len(files) < len(TRIXIE_PACKAGES):
            raise PerfAnalyzerUnavailable(
                f"apt-get download {' '.join(TRIXIE_PACKAGES)} from trixie failed: {_tail(proc.stderr or proc.stdout)}")
        tmp = Path(tempfile.mkdtemp(prefix="sysroot-", dir=root))
        for deb in files:
            proc = _run(["dpkg-deb", "-x", str(deb), str(tmp)], timeout=120)
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise PerfAnalyzerUnavailable(f"dpkg-deb -x {deb.name} failed: {_tail(proc.stderr)}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PerfAnalyzerUnavailable(f"fetching trixie libraries failed: {exc}") from exc
    if _loader(tmp) is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PerfAnalyzerUnavailable("the unpacked trixie libc6 has no ld-linux-x86-64.so.2")
    (tmp / ".complete").write_text(" ".join(f.name for f in files) + "\n")
    shutil.rmtree(sysroot, ignore_errors=True)
    tmp.rename(sysroot)
    shutil.rmtree(apt / "lists", ignore_errors=True)  # ~20 MB of indexes, not needed any more
    return sysroot


def _glibc_version() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or "unknown"
    except (ValueError, OSError):
        return "unknown"


def ensure_perf_analyzer() -> list[str]:
    """The command prefix that starts perf_analyzer 2.60.0 here (cached; set up on first call).

    Raises ``PerfAnalyzerUnavailable`` with the reason when it cannot be made to start.
    """
    global _prefix_cache
    with _prefix_lock:
        if _prefix_cache is not None:
            return list(_prefix_cache)
        override = os.environ.get("AIOS_PERF_ANALYZER_BIN")
        if override:
            ok, output = _works([override])
            if not ok:
                raise PerfAnalyzerUnavailable(f"AIOS_PERF_ANALYZER_BIN={override} does not run: {output}")
            _prefix_cache = [override]
            return list(_prefix_cache)
        if sys.platform != "linux" or os.uname().machine != "x86_64":
            raise PerfAnalyzerUnavailable(f"perf_analyzer wheels exist for linux x86_64 only, not {sys.platform} "
                                          f"{os.uname().machine}")
        root = cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        ignore = root / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n")
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one setup at a time across processes
            binary = _binary(root)
            ok, direct_output = _works([str(binary)])
            if ok:
                prefix = [str(binary)]
            else:
                sysroot = _trixie_sysroot(root)
                found = _loader(sysroot)
                if found is None:
                    raise PerfAnalyzerUnavailable(f"{sysroot} has no ld-linux-x86-64.so.2; delete it and retry")
                loader, libdirs = found
                prefix = [str(loader), "--library-path", ":".join(map(str, libdirs)), str(binary)]
                ok, output = _works(prefix)
                if not ok:
                    raise PerfAnalyzerUnavailable(
                        f"perf_analyzer does not start directly (host {_glibc_version()}: {direct_output}) "
                        f"nor through the trixie loader: {output}")
        _prefix_cache = prefix
        return list(prefix)


# --- measuring ---------------------------------------------------------------------------
def _shape_args(shape) -> list[str]:
    if shape is None:
        return []
    if isinstance(shape, str):
        items = [shape]
    elif isinstance(shape, Mapping):
        items = [f"{name}:{','.join(str(int(d)) for d in dims)}" for name, dims in shape.items()]
    else:
        items = list(shape)
    return [arg for item in items for arg in ("--shape", str(item))]


def _cpu_count(cpu: str | None) -> int:
    if cpu:
        count = 0
        for part in str(cpu).split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
        return max(count, 1)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _stdout_number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def run_perf_analyzer(
    url: str,
    model: str,
    concurrency: int,
    measurement_ms: int,
    shape=None,
    extra_args: Iterable[str] = (),
    *,
    stability_percentage: float = 100,
    max_trials: int = 10,
    measurement_mode: str = "time_windows",
    measurement_request_count: int = 1000,
    cpu: str | None = None,
    timeout_s: float | None = None,
    quiet: bool = False,
) -> dict:
    """Run perf_analyzer once (closed loop, ``concurrency`` in flight, gRPC) and parse its report.

    ``url`` is ``host:port`` (a ``grpc://`` or ``http://`` scheme is dropped). ``measurement_ms`` is
    the window length (``-p``); at least 3 windows run. ``shape`` is ``"INPUT0:16"``, a list of such
    strings, or ``{"INPUT0": [16]}`` (needed only for dynamic non-batch dims). ``cpu`` pins the
    client with ``taskset -c``. Returns ``throughput`` (infer/s), ``p50_us`` ``p90_us`` ``p95_us``
    ``p99_us`` ``avg_us``, ``request_count``, ``client_cpu`` (cores used on average),
    ``client_saturated`` (client used > 90 % of its cores: the result measures the client),
    ``wall_s``, ``command`` and ``csv_row`` (the raw CSV row as a dict of strings).
    Raises ``PerfAnalyzerUnavailable`` (no binary) or ``PerfAnalyzerError`` (the run failed).
    """
    prefix = ensure_perf_analyzer()
    host_port = re.sub(r"^[a-z]+://", "", url).rstrip("/")
    cmd = (["taskset", "-c", str(cpu)] if cpu is not None else []) + prefix
    with tempfile.TemporaryDirectory(prefix="perf_analyzer-") as tmp:
        csv_path = Path(tmp) / "report.csv"
        cmd += ["-i", "grpc", "-u", host_port, "-m", model,
                "--concurrency-range", str(int(concurrency)),
                "--measurement-mode", measurement_mode,
                "-s", str(stability_percentage), "-r", str(int(max_trials)),
                "-f", str(csv_path)]
        if measurement_mode == "count_windows":
            cmd += ["--measurement-request-count", str(int(measurement_request_count))]
        else:
            cmd += ["-p", str(int(measurement_ms))]
        cmd += _shape_args(shape) + [str(a) for a in extra_args]
        if timeout_s is None:
            timeout_s = 60 + 2 * max_trials * measurement_ms / 1000
        if not quiet:
            _log(f"measuring {model} at {host_port}, concurrency {concurrency}, {measurement_ms} ms windows"
                 + (f", client on cpu {cpu}" if cpu is not None else ""))
        started = time.perf_counter()
        with open(Path(tmp) / "stdout", "w+b") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            timer = threading.Timer(timeout_s, proc.kill)
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - started
            out.seek(0)
            output = out.read().decode(errors="replace")
        if proc.returncode != 0 or not csv_path.exists():
            why = "timed out" if proc.returncode == -9 else f"exit status {proc.returncode}"
            raise PerfAnalyzerError(f"perf_analyzer {why}: {_tail(output, 12)}\ncommand: {' '.join(cmd)}")
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    if not rows:
        raise PerfAnalyzerError(f"perf_analyzer wrote an empty report: {_tail(output, 12)}")
    row = rows[-1]

    def num(key: str) -> float:
        try:
            return float(row[key])
        except (KeyError, TypeError, ValueError):
            raise PerfAnalyzerError(f"perf_analyzer report lacks '{key}': {row}") from None

    client_cpu = (usage.ru_utime + usage.ru_stime) / wall if wall > 0 else 0.0
    result = {
        "concurrency": int(float(row.get("Concurrency", concurrency))),
        "throughput": num("Inferences/Second"),
        "p50_us": num("p50 latency"),
        "p90_us": num("p90 latency"),
        "p95_us": num("p95 latency"),
        "p99_us": num("p99 latency"),
        "avg_us": _stdout_number(r"Avg latency:\s*([0-9.]+)\s*usec", output),
        "request_count": _stdout_number(r"Request count:\s*([0-9]+)", output),
        "client_cpu": round(client_cpu, 3),
        "client_saturated": client_cpu > 0.9 * _cpu_count(cpu),
        "wall_s": round(wall, 3),
        "command": cmd,
        "csv_row": dict(row),
    }
    if not quiet:
        _log(f"{model} concurrency {concurrency}: {result['throughput']:.0f} infer/s, p50 {result['p50_us']:.0f} us, "
             f"p99 {result['p99_us']:.0f} us, client CPU {client_cpu:.2f} cores, {wall:.1f} s")
        if result["client_saturated"]:
            _log("WARNING: the load generator's cores were > 90% busy; this measures the client, not the server")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_analyzer",
                                     description="Set up and run Triton's perf_analyzer (see module docstring).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ensure", help="set perf_analyzer up; print the command prefix")
    run = sub.add_parser("run", help="measure a KServe v2 gRPC server; one JSON line per concurrency")
    run.add_argument("--url", required=True, help="host:port")
    run.add_argument("--model", required=True)
    run.add_argument("--concurrency", type=int, nargs="+", default=[1])
    run.add_argument("--measurement-ms", type=int, default=2000)
    run.add_argument("--shape", action="append", help="NAME:d1,d2 (repeatable)")
    run.add_argument("--stability", type=float, default=100, help="-s percentage (default 100)")
    run.add_argument("--max-trials", type=int, default=10)
    run.add_argument("--measurement-mode", choices=["time_windows", "count_windows"], default="time_windows")
    run.add_argument("--cpu", help="pin perf_analyzer with taskset -c CPU")
    run.add_argument("--raw", action="store_true", help="include the command and CSV row in the JSON")
    run.add_argument("extra", nargs=argparse.REMAINDER, help="-- extra perf_analyzer arguments")
    args = parser.parse_args(argv)
    try:
        prefix = ensure_perf_analyzer()
    except PerfAnalyzerUnavailable as exc:
        print(f"perf_analyzer unavailable: {exc.reason}", file=sys.stderr)
        return 2
    if args.command == "ensure":
        print(" ".join(prefix))
        return 0
    extra = [a for a in args.extra if a != "--"]
    for concurrency in args.concurrency:
        try:
            result = run_perf_analyzer(args.url, args.model, concurrency, args.measurement_ms, args.shape, extra,
                                       stability_percentage=args.stability, max_trials=args.max_trials,
                                       measurement_mode=args.measurement_mode, cpu=args.cpu)
        except PerfAnalyzerError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        if not args.raw:
            result.pop("command")
            result.pop("csv_row")
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
