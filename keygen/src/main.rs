//! `tunmesh-keygen`: WireGuard keys, byte-for-byte as `wg genkey` / `wg pubkey`.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tunmesh_keygen::PrivateKey;

#[derive(Parser)]
#[command(
    name = "tunmesh-keygen",
    version,
    about = "WireGuard-compatible X25519 keys"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a new private key (base64), like `wg genkey`.
    Genkey {
        /// Write the key to this file (mode 0600) instead of stdout.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Read a private key on stdin, print its public key, like `wg pubkey`.
    Pubkey,
    /// Write a new private key to PRIVATE (mode 0600) and its public key to PRIVATE.pub.
    Genpair {
        /// Path of the private key file.
        private: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Genkey { out } => {
            let k = PrivateKey::generate();
            match out {
                Some(p) => k.write_file(&p)?,
                None => writeln!(std::io::stdout(), "{}", k.to_base64())?,
            }
        }
        Cmd::Pubkey => {
            let mut text = String::new();
            std::io::stdin()
                .take(1024)
                .read_to_string(&mut text)
                .context("reading private key from stdin")?;
            let k = PrivateKey::from_base64(&text).context("private key on stdin")?;
            writeln!(std::io::stdout(), "{}", k.public_key())?;
        }
        Cmd::Genpair { private } => {
            let k = PrivateKey::generate();
            k.write_file(&private)?;
            let mut pubpath = private.into_os_string();
            pubpath.push(".pub");
            let pubpath = PathBuf::from(pubpath);
            std::fs::write(&pubpath, format!("{}\n", k.public_key()))
                .with_context(|| format!("writing {}", pubpath.display()))?;
            writeln!(std::io::stdout(), "{}", k.public_key())?;
        }
    }
    Ok(())
}
