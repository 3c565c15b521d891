//! The `fanfare` command: parses the CLI, loads the configuration, and hands over to
//! [`fanfare::server::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fanfare::config::{Config, LogFormat};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fanfare",
    version,
    about = "A real-time event router for WebSocket clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (built-in defaults without --config).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print an HS256 token signed with the configured secret (development and tests).
    Token {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Mint a subscription token for this conversation (`auth.subscribe_policy = "token"`)
        /// instead of a connection token.
        #[arg(long)]
        conversation: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print the effective values.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    Config::load(path.map(PathBuf::as_path)).map_err(|e| {
        eprintln!("fanfare: config: {e}");
        ExitCode::from(2)
    })
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    // glommio logs through `log`; without the bridge its warnings vanish.
    let _ = tracing_log::LogTracer::init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(&config);
            let signals = [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT];
            let stop = match fanfare::server::Stop::on_signals(&signals) {
                Ok(stop) => stop,
                Err(e) => {
                    eprintln!("fanfare: cannot install signal handler: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match fanfare::server::run(config, stop, |_| {}) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "fanfare failed");
                    eprintln!("fanfare: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token {
            tenant,
            user,
            ttl,
            conversation,
            config,
        } => {
            let config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let (auth, now_s) = (&config.auth, fanfare::auth::now_ms() / 1000);
            let minted = match &conversation {
                Some(c) => {
                    fanfare::auth::mint_hs256_subscription(auth, &tenant, &user, c, ttl, now_s)
                }
                None => fanfare::auth::mint_hs256(auth, &tenant, &user, ttl, now_s),
            };
            match minted {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fanfare: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::CheckConfig { config } => match load(Some(&config)) {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}
