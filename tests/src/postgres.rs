//! Real PostgreSQL servers for the TCP tests: a throwaway cluster per instance (initdb, trust
//! auth, fsync off) run as the `postgres` user (the server refuses root), and `pgbench` to
//! initialize and load it. The binaries come from Debian's postgresql package, which
//! `scripts/setup` installs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::proc::{Proc, Within as _};
use crate::{CLI_TIMEOUT, eventually};

/// The newest installed server's binaries (`/usr/lib/postgresql/<major>/bin`), if any.
pub fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

/// Whether PostgreSQL and pgbench can run here (binaries and the `postgres` user).
pub fn available() -> bool {
    bin_dir().is_some_and(|b| b.join("pgbench").exists())
        && Command::new("id")
            .arg("postgres")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// One running server, killed (with its workers) and removed when dropped.
pub struct Postgres {
    /// Where it listens.
    pub addr: SocketAddr,
    bin: PathBuf,
    dir: PathBuf,
    _proc: Proc,
}

impl Postgres {
    /// Initializes a cluster in a fresh directory named after `name` and starts it on `addr`;
    /// returns once it accepts connections. `log` receives its output.
    pub async fn start(name: &str, addr: SocketAddr, log: &Path) -> anyhow::Result<Self> {
        Self::start_in(None, name, addr, log).await
    }

    /// [`Postgres::start`] inside network namespace `netns` (the test process must reach
    /// `addr` from its own namespace to see it accept).
    pub async fn start_in(
        netns: Option<&str>,
        name: &str,
        addr: SocketAddr,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let bin = bin_dir().context("no PostgreSQL server installed (scripts/setup)")?;
        // Outside the test's scratch directory: the server runs as `postgres` and needs every
        // directory on the way traversable.
        let dir = std::env::temp_dir().join(format!("mesh-pg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir))?;
        let data = dir.join("data");
        let initdb = bin.join("initdb");
        run(runuser(&initdb)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data))?;
        // Clients on the server's own subnets too (a meshd on another address of its host, or
        // in its network namespace), trusted like local ones: this is a test database.
        let hba = data.join("pg_hba.conf");
        let mut conf = std::fs::read_to_string(&hba)?;
        conf.push_str("\nhost all all samenet trust\n");
        std::fs::write(&hba, conf)?;
        let postgres = bin.join("postgres");
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        let socket_dir = dir.to_string_lossy().into_owned();
        let data_s = data.to_string_lossy().into_owned();
        let args = [
            "-u",
            "postgres",
            "--",
            &postgres.to_string_lossy(),
            "-D",
            &data_s,
            "-h",
            &ip,
            "-p",
            &port,
            "-k",
            &socket_dir,
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "max_connections=200",
        ];
        let proc = Proc::start(netns, Path::new("runuser"), &args, log)?;
        let what = format!("postgres {name} on {addr}");
        eventually(Duration::from_secs(30), &what, || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await?;
        Ok(Self {
            addr,
            bin,
            dir,
            _proc: proc,
        })
    }

    /// `pgbench -i` at scale 1 (100,000 accounts), directly against this server.
    pub fn init_pgbench(&self) -> anyhow::Result<()> {
        let out = Command::new(self.bin.join("pgbench"))
            .args(["-i", "-q", "-s", "1", "-U", "postgres"])
            .args([
                "-h",
                &self.addr.ip().to_string(),
                "-p",
                &self.addr.port().to_string(),
            ])
            .arg("postgres")
            .within(CLI_TIMEOUT)?;
        if !out.status.success() {
            bail!("pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The `pgbench` binary.
    pub fn pgbench(&self) -> PathBuf {
        self.bin.join("pgbench")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one pgbench run reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bench {
    /// Whether pgbench exited 0 (no client aborted).
    pub ok: bool,
    /// Transactions processed.
    pub processed: u64,
    /// Transactions that failed (pgbench ≥ 15 counts them).
    pub failed: u64,
    /// Clients aborted (a connection lost mid-transaction, or refused).
    pub aborted: u64,
    /// Its stdout and stderr, for a failure message.
    pub output: String,
}

/// Runs `pgbench -S -C` (read-only, a new connection per transaction) with `clients` clients
/// for `secs` seconds against `addr`, with `pgbench` the binary.
pub fn select_load(
    pgbench: &Path,
    addr: SocketAddr,
    clients: u32,
    secs: u32,
) -> anyhow::Result<Bench> {
    let out = Command::new(pgbench)
        .args(["-S", "-C", "-n", "-U", "postgres"])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
        ])
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .arg("postgres")
        .within(Duration::from_secs(u64::from(secs)) + CLI_TIMEOUT)?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(parse(out.status.success(), output))
}

/// Reads the counts out of pgbench's report.
pub fn parse(ok: bool, output: String) -> Bench {
    let number_after = |label: &str| {
        (output.lines())
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let aborted = output.lines().filter(|l| l.contains(" aborted")).count() as u64;
    Bench {
        ok,
        processed: number_after("number of transactions actually processed:"),
        failed: number_after("number of failed transactions:"),
        aborted,
        output,
    }
}

fn runuser(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.within(CLI_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench_reports() {
        let report = "transaction type: <builtin: select only>\n\
            number of transactions actually processed: 1234\n\
            number of failed transactions: 0 (0.000%)\n\
            latency average = 3.1 ms\n";
        let b = parse(true, report.to_owned());
        assert_eq!((b.processed, b.failed, b.aborted), (1234, 0, 0));
        let aborted = "pgbench: error: client 2 aborted in command 1 (SQL) of script 0\n\
            number of transactions actually processed: 10\n\
            number of failed transactions: 3 (23.077%)\n";
        let b = parse(false, aborted.to_owned());
        assert_eq!((b.processed, b.failed, b.aborted, b.ok), (10, 3, 1, false));
    }
}
