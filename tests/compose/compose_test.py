#!/usr/bin/env python3
"""The compose test: runs the real docker-compose.yml and Dockerfile, unchanged, on a copy of the
repository, as a user would (`docker compose up --build`), and checks what the README promises.

Started by scripts/compose-test, which installs Docker, Compose and the base images first. Host
ports are moved only through the compose variables (RABBITMQ_PORT, RABBITMQ_UI_PORT, FEATURES_PORT,
METRIC_PORT, TRAINER_PORT); ./logs and ./models of the copy belong to a uid other than 1000. The stack runs
under a unique project name and is removed with `down -v` at the end, also on failure.
Prints one line per check and `compose: N passed, M failed`; exits 1 on any failure.
"""

import base64
import csv
import datetime
import io
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Owner of ./logs and ./models in the copy: anyone but 1000, the uid the image used to assume.
OWNER_UID = int(os.environ.get("COMPOSE_TEST_OWNER_UID", "4321"))
# Samples per second during the test, through the compose file's RATE variable.
RATE = os.environ.get("COMPOSE_TEST_RATE", "50")
SERVICES = ["features", "metric", "model", "rabbitmq", "trainer"]
# The pipeline's three queues, the trainer's two bounded copies and the loss audit's queue, each
# with its dead-letter queue.
QUEUES = {
    "features", "y_true", "y_pred", "features.dlq", "y_true.dlq", "y_pred.dlq",
    "features.train", "y_true.train", "features.train.dlq", "y_true.train.dlq",
    "y_true.audit", "y_true.audit.dlq",
}
ALL_UP = {"features": 1, "model": 1, "metric": 1, "rabbitmq": 1, "trainer": 1}


def say(text):
    print(f"compose-test: {text}", flush=True)


def as_root(args):
    """Runs a command as root (sudo when not root): the copy's ./logs belongs to another uid."""
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run(prefix + args, check=True)


def free_ports(count):
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def copy_repo(dest):
    """Copies what a clone holds plus local changes (tracked and untracked, not ignored files)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = REPO / os.fsdecode(name)
        if source.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for folder in ["logs", "models"]:
        (dest / folder).mkdir(exist_ok=True)


def elf_section_names(path):
    """Names of an ELF64 file's sections, to tell whether debug info was shipped."""
    data = Path(path).read_bytes()
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    strtab_offset = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)[0]
    names = []
    for index in range(shnum):
        name_offset = struct.unpack_from("<I", data, shoff + index * shentsize)[0]
        start = strtab_offset + name_offset
        names.append(data[start : data.index(b"\0", start)].decode())
    return names


def parse_time(text):
    """Docker's RFC 3339 time with nanoseconds, as seconds since the epoch."""
    head, _, rest = text.partition(".")
    fraction = rest.rstrip("Z")[:6] if rest else "0"
    moment = datetime.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc
    )
    return moment.timestamp() + float("0." + fraction)


class Stack:
    """One compose project on the copy, with the test's ports."""

    def __init__(self, folder, env, ui_port, log_file):
        self.folder = folder
        self.env = env
        self.ui_port = ui_port
        self.log_file = log_file

    def compose(self, *args, timeout=1800, check=True):
        with open(self.log_file, "a") as log:
            log.write(f"\n$ docker compose {' '.join(args)}\n")
            log.flush()
            done = subprocess.run(
                ["docker", "compose", *args],
                cwd=self.folder,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        if check and done.returncode != 0:
            raise RuntimeError(f"docker compose {' '.join(args)} exited {done.returncode}")
        return done.returncode

    def output(self, *args, timeout=120):
        return subprocess.run(
            ["docker", "compose", *args],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout

    def containers(self):
        """Containers of the project: service, id, state, health."""
        found = []
        for line in self.output("ps", "-a", "--format", "json").splitlines():
            line = line.strip()
            if not line:
                continue
            items = json.loads(line)
            for item in items if isinstance(items, list) else [items]:
                found.append(item)
        return found

    def all_healthy(self, expected):
        """True when exactly `expected` ({service: count}) containers run, all healthy."""
        counts = {}
        for c in self.containers():
            if c.get("State") != "running" or c.get("Health") != "healthy":
                return False
            counts[c["Service"]] = counts.get(c["Service"], 0) + 1
        return counts == expected

    def api(self, path):
        request = urllib.request.Request(f"http://127.0.0.1:{self.ui_port}/api/{path}")
        request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def queue_depths(self):
        """Messages in each queue, exact (rabbitmqctl), unlike the management API's 5 s samples."""
        out = self.output("exec", "-T", "rabbitmq", "rabbitmqctl", "-q", "list_queues", "name", "messages")
        depths = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                depths[parts[0]] = int(parts[1])
        return depths

    def model_acked(self, index):
        """pipeline_messages_acked_total{queue="features"} of model replica `index`, read from its
        /metrics inside the container (the port is not published; the slim image has bash)."""
        script = (
            "exec 3<>/dev/tcp/127.0.0.1/9102; "
            "printf 'GET /metrics HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' >&3; cat <&3"
        )
        text = self.output("exec", "-T", "--index", str(index), "model", "bash", "-c", script)
        for line in text.splitlines():
            if line.startswith('pipeline_messages_acked_total{queue="features"}'):
                return float(line.split()[-1])
        return 0.0

    def csv_text(self):
        path = self.folder / "logs" / "metric_log.csv"
        return path.read_text() if path.exists() else ""

    def rows(self):
        return list(csv.DictReader(io.StringIO(self.csv_text())))

    def logged_ids(self, queue):
        path = self.folder / "logs" / "labels_log.txt"
        ids = set()
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 4 and parts[1] == queue and parts[2] != "-":
                    ids.add(parts[2])
        return ids


def check_prometheus(stack, checks):
    """The monitoring profile's Prometheus, started while three model replicas run: every scrape
    target up (each replica found by DNS, the broker's own endpoints), the alert rules loaded,
    pipeline and per-queue broker series queryable. Grafana has no stand-in image here, so only
    Prometheus is started; it is removed again before the next steps count containers."""
    port = stack.env["PROMETHEUS_PORT"]

    def api(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=10) as response:
            return json.load(response)["data"]

    def value(query):
        result = api("query?query=" + urllib.parse.quote(query))["result"]
        return float(result[0]["value"][1]) if result else None

    wanted = {"features": 1, "model": 3, "metric": 1, "trainer": 1, "rabbitmq": 1, "rabbitmq-queues": 1}

    def targets_up():
        try:
            up = {}
            for target in api("targets?state=active")["activeTargets"]:
                if target["health"] == "up":
                    job = target["labels"]["job"]
                    up[job] = up.get(job, 0) + 1
        except Exception as error:  # not answering yet
            targets_up.seen = repr(error)
            return False
        targets_up.seen = up
        return up == wanted

    targets_up.seen = None
    stack.compose("--profile", "monitoring", "up", "-d", "--no-deps", "prometheus")
    try:
        ok = wait_for(120, targets_up, step=2.0)
        rules = [r["name"] for g in api("rules")["groups"] for r in g["rules"]]
        pairs = value("sum(pipeline_pairs_total)")
        consumers = value('rabbitmq_detailed_queue_consumers{queue="features"}')
        firing = sorted({a["labels"]["alertname"] for a in api("alerts")["alerts"] if a["state"] == "firing"})
    except Exception as error:  # reported as the check's detail
        ok, rules, pairs, consumers, firing = False, [], None, None, [repr(error)]
    finally:
        stack.compose("--profile", "monitoring", "rm", "-sf", "prometheus", check=False)
    checks.record(
        "monitoring profile: Prometheus scrapes all, 3 model replicas by DNS, rules loaded",
        ok and len(rules) >= 9 and (pairs or 0) > 0 and consumers == 3 and not firing,
        f"targets up by job {targets_up.seen} (wanted {wanted}); {len(rules)} alert rules; "
        f"sum(pipeline_pairs_total) {pairs}; consumers on features (rabbitmq-queues) {consumers}; "
        f"firing {firing}",
    )


def wait_for(seconds, condition, step=1.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            if condition():
                return True
        except (OSError, RuntimeError, subprocess.SubprocessError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def record(self, name, ok, detail):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(f"compose: {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return ok


def complete_csv_prefix(before, after):
    """The rows written before are still the first rows after (whole lines only)."""
    whole = before[: before.rfind("\n") + 1]
    return after.startswith(whole)


def unique_ids(stack):
    ids = [row["id"] for row in stack.rows()]
    return len(ids) == len(set(ids)), len(ids)


def under_load(stack, checks, name, action):
    """Runs `action` while samples flow, then checks that rows kept coming, that the rows written
    before are a prefix of the file after, and that no id is there twice."""
    before = stack.csv_text()
    rows_before = len(stack.rows())
    started = time.monotonic()
    action()
    back = wait_for(
        120,
        lambda: stack.all_healthy(ALL_UP)
        and len(stack.rows()) >= rows_before + 100,
    )
    after = stack.csv_text()
    unique, count = unique_ids(stack)
    checks.record(
        name,
        back and complete_csv_prefix(before, after) and unique,
        f"healthy again and +100 rows after {time.monotonic() - started:.0f} s: {back}; "
        f"rows {rows_before} -> {count}, earlier rows a prefix: {complete_csv_prefix(before, after)}, "
        f"no id twice: {unique}",
    )


def dangling_images():
    return subprocess.run(
        ["docker", "images", "-q", "--no-trunc", "--filter", "dangling=true"],
        capture_output=True,
        text=True,
    ).stdout.split()


def remove_replaced_images(before):
    """Removes the ml-pipeline images this run left untagged. Compose labels the image with the
    project name, so each run under a new name tags a new image id (the same layers, no extra
    space) and the previous one loses its tag; a user's reruns under one name keep the id."""
    for image in set(dangling_images()) - set(before):
        labels = subprocess.run(
            ["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", image],
            capture_output=True,
            text=True,
        ).stdout
        if '"com.docker.compose.service":"features"' in labels:
            subprocess.run(["docker", "rmi", image], capture_output=True)


def run(checks, stack, work, timings, image_before):
    copy = stack.folder

    # 1. The README's command, with the ports moved through the variables.
    started = time.monotonic()
    stack.compose("up", "--build", "-d")
    timings["up --build -d"] = time.monotonic() - started
    healthy = wait_for(
        60, lambda: stack.all_healthy(ALL_UP)
    )
    created = []
    for c in stack.containers():
        inspected = subprocess.run(
            ["docker", "inspect", "-f", "{{.Created}}", c["ID"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        created.append(parse_time(inspected))
    since_created = time.time() - min(created) if created else float("nan")
    timings["containers created to 5 healthy"] = since_created
    if not checks.record(
        "up --build: five containers healthy",
        healthy,
        f"all healthy {since_created:.0f} s after the first container was created "
        f"(up --build -d took {timings['up --build -d']:.0f} s)",
    ):
        return

    # 2. Rows grow, and every file in ./logs belongs to the owner of ./logs.
    first = len(stack.rows())
    time.sleep(5)
    second = len(stack.rows())
    owners = {
        path.name: f"{path.stat().st_uid}:{path.stat().st_gid}"
        for path in (copy / "logs").iterdir()
    }
    wanted = f"{OWNER_UID}:{OWNER_UID}"
    files_ok = (
        {"labels_log.txt", "metric_log.csv"} <= owners.keys()
        and all(owner == wanted for owner in owners.values())
    )
    checks.record(
        "rows grow, ./logs files belong to the owner of ./logs",
        second > first and files_ok,
        f"rows {first} -> {second} in 5 s; owners {owners} (./logs is {wanted})",
    )

    # 3. The management API: four connections named after the services, twelve queues.
    def api_ok():
        names = sorted(
            (c.get("client_properties") or {}).get("connection_name", "?").split(" (")[0]
            for c in stack.api("connections")
        )
        queues = {q["name"] for q in stack.api("queues/%2f")}
        api_ok.seen = (names, sorted(queues))
        return names == ["features", "metric", "model", "trainer"] and queues == QUEUES

    api_ok.seen = None
    ok = wait_for(30, api_ok)
    checks.record(
        "management API: four named connections, twelve queues",
        ok,
        f"connections {api_ok.seen[0] if api_ok.seen else '?'}, queues {api_ok.seen[1] if api_ok.seen else '?'}",
    )

    # 4. One image for the four services, built once, shipped without debug info.
    images = {}
    for c in stack.containers():
        if c["Service"] != "rabbitmq":
            images[c["Service"]] = subprocess.run(
                ["docker", "inspect", "-f", "{{.Image}}", c["ID"]],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
    # The previous ml-pipeline:latest loses its tag (one image: changed sources, or this run's
    # project label); the old pattern, three services building one tag, left two per build.
    new_dangling = len(set(dangling_images()) - set(image_before))
    built_names = open(stack.log_file).read().count("naming to docker.io/library/ml-pipeline:latest")
    metric_id = next(c["ID"] for c in stack.containers() if c["Service"] == "metric")
    debug = {}
    for binary in ["features", "model", "metric", "trainer"]:
        local = work / binary
        subprocess.run(
            ["docker", "cp", f"{metric_id}:/usr/local/bin/{binary}", str(local)],
            check=True,
            capture_output=True,
        )
        debug[binary] = [n for n in elf_section_names(local) if n.startswith(".debug")]
    checks.record(
        "one image, built once, no debug info",
        len(set(images.values())) == 1
        and len(images) == 4
        and built_names <= 1
        and new_dangling <= 1
        and not any(debug.values()),
        f"image of features/model/metric/trainer: {sorted(set(i[7:19] for i in images.values()))}, "
        f"tagged {built_names} time(s) by the build, new dangling images {new_dangling}, "
        f"debug sections {debug}",
    )

    # 5. A model artifact trained into ./models, by the owner of ./models.
    code = stack.compose(
        "run", "--rm", "--no-deps", "model", "model", "train",
        "--data", "data/diabetes.csv", "--out", "models/model.json", "--version", "compose-test",
        check=False,
    )
    artifact = copy / "models" / "model.json"
    owner = f"{artifact.stat().st_uid}:{artifact.stat().st_gid}" if artifact.exists() else "-"
    version = json.loads(artifact.read_text()).get("version") if artifact.exists() else "-"
    # ... and served: compose's MODEL_PATH is models/model.json, which the replicas watch.
    stack.compose("up", "-d")
    served = wait_for(
        90,
        lambda: any(row["model_version"] == "compose-test" for row in stack.rows()[-50:]),
    )
    checks.record(
        "model train --out models/model.json, served from MODEL_PATH",
        code == 0 and owner == wanted and version == "compose-test" and served,
        f"exit {code}, artifact version {version}, owner {owner} (./models is {wanted}); "
        f"rows with model_version compose-test after writing models/model.json: {served}",
    )

    # 5b. The trainer retrains on request from the window it collected (RETRAIN_EVERY=0 here, so
    # the served version stays compose-test for the checks above): promoted or refused, a
    # decision with both MAEs, and its window in ./models/train, owned by the owner of ./models.
    try:
        with urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{stack.env['TRAINER_PORT']}/retrain", method="POST"),
            timeout=60,
        ) as response:
            outcome = json.load(response)
    except Exception as error:  # reported as the check's detail
        outcome = {"error": repr(error)}
    journal = copy / "models" / "train" / "window.jsonl"
    journal_owner = f"{journal.stat().st_uid}:{journal.stat().st_gid}" if journal.exists() else "-"
    checks.record(
        "trainer: POST /retrain decides with both MAEs, window in ./models/train",
        outcome.get("result") in ("promoted", "refused")
        and "serving_mae" in outcome
        and "candidate_mae" in outcome
        and journal_owner == wanted,
        f"outcome {outcome}; {journal} owner {journal_owner} (./models is {wanted})",
    )

    # 5c. A user's own ONNX model by two variables: the image carries ONNX Runtime, so MODEL_PATH
    # (and DATA_PATH, the data it was trained on) is all it takes. Then back to models/model.json.
    shutil.copy(copy / "tests" / "models" / "fixtures" / "gbr.onnx", copy / "models" / "my-model.onnx")
    stack.env.update(MODEL_PATH="models/my-model.onnx", DATA_PATH="data/diabetes.csv")
    stack.compose("up", "-d")
    onnx_served = wait_for(
        120,
        lambda: any(row["model_version"] == "gbr-1" for row in stack.rows()[-50:]),
    )
    inspected = subprocess.run(
        ["docker", "compose", "run", "--rm", "--no-deps", "model", "model", "inspect",
         "--model", "models/my-model.onnx", "--data", "data/diabetes.csv"],
        cwd=stack.folder, env=stack.env, capture_output=True, text=True, timeout=300,
    )
    for name in ("MODEL_PATH", "DATA_PATH"):
        stack.env.pop(name, None)
    stack.compose("up", "-d")
    back = wait_for(
        120,
        lambda: any(row["model_version"] == "compose-test" for row in stack.rows()[-20:]),
    )
    checks.record(
        "a user's .onnx served by MODEL_PATH and DATA_PATH (the image's ONNX Runtime), then back",
        onnx_served and inspected.returncode == 0 and "accepted" in inspected.stdout and back,
        f"rows with model_version gbr-1: {onnx_served}; model inspect exit {inspected.returncode}: "
        f"{(inspected.stdout + inspected.stderr).strip()[-300:]}; back to compose-test: {back}",
    )

    # 6. Three model consumers on `features`, each handling messages.
    stack.compose("up", "-d", "--scale", "model=3")
    three = wait_for(
        90,
        lambda: stack.all_healthy({**ALL_UP, "model": 3})
        and len([c for c in stack.api("consumers/%2f") if c["queue"]["name"] == "features"]) == 3,
    )
    first = [stack.model_acked(i) for i in (1, 2, 3)] if three else []
    time.sleep(8)
    second = [stack.model_acked(i) for i in (1, 2, 3)] if three else []
    checks.record(
        "--scale model=3: three consumers on features, each handling messages",
        three and all(b > a for a, b in zip(first, second)),
        f"three healthy consumers: {three}; acked per replica {first} -> {second} in 8 s",
    )
    if three:
        check_prometheus(stack, checks)
    stack.compose("up", "-d", "--scale", "model=1")

    # 7, 8. The whole stack stopped and started, then the broker restarted, while samples flow.
    under_load(
        stack, checks, "stop then start under load",
        lambda: (stack.compose("stop"), stack.compose("start")),
    )
    under_load(
        stack, checks, "restart rabbitmq under load",
        lambda: stack.compose("restart", "rabbitmq"),
    )

    # 9. down then up: messages still queued are delivered (the broker's named volume).
    stack.compose("stop", "model", "metric")
    time.sleep(4)
    stack.compose("stop", "features")
    queued = stack.queue_depths()
    rows_before = len(stack.rows())
    stack.compose("down")
    volumes = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={stack.env['COMPOSE_PROJECT_NAME']}"],
        capture_output=True, text=True,
    ).stdout.split()
    # No producer this time: every new row comes from a message that waited through `down`.
    stack.compose("up", "-d", "--scale", "features=0")
    drained = wait_for(
        120,
        lambda: stack.all_healthy({"model": 1, "metric": 1, "rabbitmq": 1, "trainer": 1})
        and all(n == 0 for name, n in stack.queue_depths().items() if not name.endswith(".dlq"))
        and len(stack.rows()) >= rows_before + queued.get("y_true", 0),
    )
    rows_after = len(stack.rows())
    checks.record(
        "down then up: queued messages delivered",
        drained and queued.get("y_true", 0) > 0 and rows_after - rows_before >= queued["y_true"],
        f"queued before down {queued}, volumes kept {volumes}; rows {rows_before} -> {rows_after}",
    )

    # 10. After all of it, with the queues drained: one row per id, every y_true joined.
    unique, count = unique_ids(stack)
    y_true = stack.logged_ids("y_true")
    joined = {row["id"] for row in stack.rows()}
    missing = y_true - joined
    checks.record(
        "every y_true joined, no id twice",
        unique and not missing and count > 0,
        f"{count} rows, {len(y_true)} y_true ids logged, not joined {len(missing)}, no id twice: {unique}",
    )

    # 11. Your own training code under compose: the trainer in an image with Python
    # (examples/trainer-python), TRAIN_COMMAND running examples/train_sklearn.py on its window;
    # POST /retrain scores what it trains, and a promoted .onnx is what the replicas serve next.
    built = subprocess.run(
        ["docker", "build", "-q", "-f", "examples/trainer-python/Dockerfile",
         "-t", "ml-pipeline-trainer-python", "."],
        cwd=stack.folder, env=stack.env, capture_output=True, text=True, timeout=1800,
    )
    files = ["-f", "docker-compose.yml", "-f", "examples/compose.train-command.yml"]
    outcome, served = {}, None
    if built.returncode == 0:
        stack.env["MODEL_PATH"] = "models/model.onnx"
        stack.compose(*files, "up", "-d", "--scale", "features=1")
        wait_for(120, lambda: stack.all_healthy({**ALL_UP, "features": 1}))
        try:
            with urllib.request.urlopen(
                urllib.request.Request(
                    f"http://127.0.0.1:{stack.env['TRAINER_PORT']}/retrain", method="POST"
                ),
                timeout=300,
            ) as response:
                outcome = json.load(response)
        except Exception as error:  # reported as the check's detail
            outcome = {"error": repr(error)}
        candidate = outcome.get("candidate_version")
        if outcome.get("result") == "promoted":
            served = wait_for(
                120,
                lambda: any(row["model_version"] == candidate for row in stack.rows()[-20:]),
            )
    checks.record(
        "TRAIN_COMMAND in an image with Python: the trainer scores what it trains",
        built.returncode == 0
        and outcome.get("result") in ("promoted", "refused")
        and "candidate_mae" in outcome
        and (outcome.get("result") == "refused" or served),
        f"build exit {built.returncode} {built.stderr.strip()[-200:]}; outcome {outcome}; "
        f"promoted version served: {served}",
    )
    stack.env.pop("MODEL_PATH", None)
    stack.compose("up", "-d", "--scale", "features=0")
    subprocess.run(["docker", "rmi", "ml-pipeline-trainer-python"], capture_output=True)


def main():
    work = Path(tempfile.mkdtemp(prefix="compose-test-"))
    copy = work / "ml-pipeline"
    copy.mkdir()
    copy_repo(copy)
    as_root(["chown", "-R", f"{OWNER_UID}:{OWNER_UID}", str(copy / "logs"), str(copy / "models")])
    rabbitmq_port, ui_port, features_port, metric_port, trainer_port, prometheus_port = free_ports(6)
    project = f"pipelinetest{os.getpid()}{random.randrange(1000, 9999)}"
    env = dict(os.environ)
    # Only the compose file's own variables; nothing of the caller's shell leaks in.
    for name in [
        "DATA_PATH", "TARGET_COLUMN", "MODEL_PATH", "BIND_ADDRESS", "RATE", "RETRAIN_EVERY", "PARTITIONS",
    ]:
        env.pop(name, None)
    env.update(
        COMPOSE_PROJECT_NAME=project,
        RABBITMQ_PORT=str(rabbitmq_port),
        RABBITMQ_UI_PORT=str(ui_port),
        FEATURES_PORT=str(features_port),
        METRIC_PORT=str(metric_port),
        TRAINER_PORT=str(trainer_port),
        PROMETHEUS_PORT=str(prometheus_port),
        RATE=RATE,
        # Retrains only on request: the served version must stay what step 5 trained.
        RETRAIN_EVERY="0",
    )
    stack = Stack(copy, env, ui_port, work / "compose.log")
    say(
        f"project {project} in {copy}; ./logs and ./models owned by {OWNER_UID}; ports "
        f"AMQP {rabbitmq_port}, UI {ui_port}, features {features_port}, metric {metric_port}, "
        f"trainer {trainer_port}; RATE={RATE}"
    )
    checks = Checks()
    timings = {}
    started = time.monotonic()
    image_before = dangling_images()
    try:
        run(checks, stack, work, timings, image_before)
    except Exception as error:  # any failure of the harness itself is a failed check
        checks.record("compose test ran to the end", False, repr(error))
    finally:
        if checks.failed:
            say("what compose saw (last lines):")
            lines = open(stack.log_file).read().splitlines() if stack.log_file.exists() else []
            print("\n".join(lines[-40:]))
            subprocess.run(["docker", "compose", "ps", "-a"], cwd=copy, env=env)
            subprocess.run(["docker", "compose", "logs", "--tail", "15"], cwd=copy, env=env)
        stack.compose("--profile", "monitoring", "down", "-v", "--remove-orphans", check=False)
        remove_replaced_images(image_before)
        as_root(["rm", "-rf", str(work)])
    for name, seconds in timings.items():
        say(f"time: {name} {seconds:.0f} s")
    say(f"time: whole test {time.monotonic() - started:.0f} s")
    print(f"compose: {checks.passed} passed, {checks.failed} failed", flush=True)
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
