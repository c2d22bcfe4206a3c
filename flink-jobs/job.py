"""Runs the Flink SQL jobs of sql/usage.sql: on a local mini-cluster (default) or on an
existing Flink cluster (--jobmanager HOST:PORT, its REST endpoint). Started by `run`, which
provides PyFlink (the `apache-flink` package) and the connector jars.

Checkpoints are taken every --checkpoint-interval-ms into --checkpoint-dir and kept when the
job stops; on start the newest complete checkpoint found there is restored (Kafka offsets,
deduplication and aggregate state), so a job killed mid-stream resumes where its last
checkpoint was and the upsert sinks overwrite what it had written since with the same
absolute figures.
"""

import argparse
import glob
import os
import re
import sys
from urllib.parse import unquote, urlparse

HERE = os.path.dirname(os.path.abspath(__file__))


def jdbc_from_database_url(url):
    """postgres://user:pass@host:port/db -> (jdbc:postgresql://host:port/db, user, pass)."""
    u = urlparse(url)
    if u.scheme not in ("postgres", "postgresql"):
        raise SystemExit(f"--database-url must be postgres://..., got {u.scheme}://")
    host = u.hostname or "127.0.0.1"
    port = u.port or 5432
    query = f"?{u.query}" if u.query else ""
    return (
        f"jdbc:postgresql://{host}:{port}{u.path}{query}",
        unquote(u.username or ""),
        unquote(u.password or ""),
    )


def latest_checkpoint(directory):
    """The newest complete checkpoint (a chk-N with its _metadata) under directory, if any."""
    best = None
    for meta in glob.glob(os.path.join(directory, "*", "chk-*", "_metadata")):
        chk = os.path.dirname(meta)
        key = (os.path.getmtime(meta), int(chk.rsplit("-", 1)[1]))
        if best is None or key > best[0]:
            best = (key, chk)
    return best[1] if best else None


def statements(sql):
    """The statements of a SQL file: comments dropped, split at ';' ending a line."""
    text = "\n".join(
        line for line in sql.splitlines() if not line.lstrip().startswith("--")
    )
    return [s.strip() for s in re.split(r";\s*\n", text + "\n") if s.strip()]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kafka-bootstrap", required=True)
    p.add_argument("--topic", default="llm.completions")
    p.add_argument("--group-id", default="tollgate-flink")
    p.add_argument("--database-url", required=True)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--checkpoint-interval-ms", type=int, default=5000)
    p.add_argument("--price-refresh-ms", type=int, default=1000)
    p.add_argument("--parallelism", type=int, default=1)
    p.add_argument("--bounded", action="store_true")
    p.add_argument("--jobmanager")
    p.add_argument("--jars", required=True, help="directory of the connector jars")
    p.add_argument("--sql", default=os.path.join(HERE, "sql", "usage.sql"))
    a = p.parse_args()

    # Imported here so that --help works without PyFlink.
    from pyflink.common import Configuration
    from pyflink.table import EnvironmentSettings, TableEnvironment

    jdbc_url, user, password = jdbc_from_database_url(a.database_url)
    variables = {
        "KAFKA_BOOTSTRAP": a.kafka_bootstrap,
        "TOPIC": a.topic,
        "GROUP_ID": a.group_id,
        "KAFKA_BOUNDED": "'scan.bounded.mode' = 'latest-offset'," if a.bounded else "",
        "JDBC_URL": jdbc_url,
        "JDBC_USER": user,
        "JDBC_PASSWORD": password,
        "PRICE_REFRESH_MS": str(a.price_refresh_ms),
    }
    with open(a.sql, encoding="utf-8") as f:
        sql = f.read()
    for name, value in variables.items():
        if name != "KAFKA_BOUNDED":  # a piece of SQL; every other value is a string literal
            value = value.replace("'", "''")
        sql = sql.replace("${" + name + "}", value)
    left = re.findall(r"\$\{[A-Z_]+\}", sql)
    if left:
        raise SystemExit(f"unknown variables in {a.sql}: {sorted(set(left))}")

    checkpoint_dir = os.path.abspath(a.checkpoint_dir)
    os.makedirs(checkpoint_dir, exist_ok=True)
    conf = Configuration()
    settings = {
        "parallelism.default": str(a.parallelism),
        "execution.checkpointing.interval": f"{a.checkpoint_interval_ms} ms",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        "execution.checkpointing.dir": "file://" + checkpoint_dir,
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "execution.checkpointing.num-retained": "2",
        "state.backend.type": "hashmap",
        "table.local-time-zone": "UTC",
        # No source idle timeout, on purpose: a Kafka source declared idle would let the price
        # book's watermark (far ahead, or the end of its bounded scan) drive the temporal joins,
        # which then drop the older price versions that later events still need. So the newest
        # minutes are written once every partition's events have moved the watermark past them
        # (or at the end of a --bounded run).
        # No mini-batches: a mini-batched deduplication flushes its last rows after the final
        # watermark at the end of a bounded run, and the temporal joins then see them as late.
        "table.exec.mini-batch.enabled": "false",
        "pipeline.name": "tollgate-usage",
        "pipeline.jars": ";".join(
            "file://" + os.path.abspath(j)
            for j in sorted(glob.glob(os.path.join(a.jars, "*.jar")))
        ),
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": "3",
        "restart-strategy.fixed-delay.delay": "2 s",
    }
    if a.jobmanager:
        host, _, port = a.jobmanager.rpartition(":")
        settings.update({"execution.target": "remote", "rest.address": host, "rest.port": port})
    restore = latest_checkpoint(checkpoint_dir)
    if restore:
        settings["execution.state-recovery.path"] = restore
        print(f"restoring from checkpoint {restore}", file=sys.stderr, flush=True)
    for k, v in settings.items():
        conf.set_string(k, v)

    env = TableEnvironment.create(
        EnvironmentSettings.new_instance().in_streaming_mode().with_configuration(conf).build()
    )
    inserts = env.create_statement_set()
    for stmt in statements(sql):
        if stmt.upper().startswith("INSERT"):
            inserts.add_insert_sql(stmt)
        else:
            env.execute_sql(stmt)
    result = inserts.execute()
    job = result.get_job_client()
    if job is not None:
        print(f"job {job.get_job_id()} submitted", file=sys.stderr, flush=True)
    # Streaming: runs until cancelled; --bounded: until the topic's end at start is read.
    result.wait()
    print("job finished", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
