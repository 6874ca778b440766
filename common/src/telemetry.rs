//! Tracing set-up: readable lines for people, JSON lines when
//! `ENTRIP__LOG__FORMAT=json`. `RUST_LOG` overrides the configured level.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, fmt::writer::BoxMakeWriter, prelude::*};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber, logging to stdout. Calling it twice is
/// harmless (tests do).
pub fn init(settings: &LogSettings) {
    install(settings, false);
}

/// Like [`init`], but logs to stderr: for operator commands whose stdout is
/// their answer (e.g. `ingest clients create` prints a key for a script).
pub fn init_to_stderr(settings: &LogSettings) {
    install(settings, true);
}

fn install(settings: &LogSettings, to_stderr: bool) {
    let (writer, terminal) = if to_stderr {
        (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        )
    } else {
        (
            BoxMakeWriter::new(std::io::stdout),
            std::io::stdout().is_terminal(),
        )
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match settings.format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .with_writer(writer)
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(
                fmt::layer()
                    .with_writer(writer)
                    .with_target(false)
                    // Colours only on a terminal (scripts/run pipes output).
                    .with_ansi(terminal),
            )
            .try_init(),
    };
    // An already installed subscriber (e.g. in tests) is fine.
    drop(result);
}
