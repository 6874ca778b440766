//! Tracing set-up: readable lines for people, JSON lines when
//! `ENTRIP__LOG__FORMAT=json`. `RUST_LOG` overrides the configured level.
//! With `log.otlp_endpoint` set, spans are also exported with OTLP over
//! HTTP (JSON), each in the trace of the `traceparent` that caused it
//! (docs/configuration.md, "Tracing").

use std::{io::IsTerminal, sync::OnceLock};

use opentelemetry::{
    Context,
    trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        TracerProvider as _,
    },
};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{EnvFilter, fmt, fmt::writer::BoxMakeWriter, prelude::*};

use crate::{
    config::{LogFormat, LogSettings},
    trace::TraceParent,
};

/// The exporting provider, when `log.otlp_endpoint` is set: kept to flush
/// it at shutdown.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber, logging to stdout, and the OTLP export
/// of `service`'s spans when configured. Calling it twice is harmless
/// (tests do).
pub fn init(settings: &LogSettings, service: &'static str) {
    install(settings, service, false);
}

/// Like [`init`], but logs to stderr: for operator commands whose stdout is
/// their answer (e.g. `ingest clients create` prints a key for a script).
pub fn init_to_stderr(settings: &LogSettings, service: &'static str) {
    install(settings, service, true);
}

/// Whether spans are exported (a caller may skip work only export needs).
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// Makes `span` a child of the remote span `traceparent` names, so that the
/// exported span joins the caller's trace. Does nothing when nothing is
/// exported or there is no trace context.
pub fn join_trace(span: &tracing::Span, traceparent: Option<&TraceParent>) {
    let Some(tp) = traceparent.filter(|_| exporting()) else {
        return;
    };
    let (Ok(trace_id), Ok(span_id)) = (
        TraceId::from_hex(tp.trace_id()),
        SpanId::from_hex(tp.parent_id()),
    ) else {
        return;
    };
    let flags = if tp.sampled() {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let remote = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    // Refused only when the span is disabled (filtered out): nothing to join.
    drop(span.set_parent(Context::new().with_remote_span_context(remote)));
}

/// Exports the spans not yet sent and stops the exporter: the last thing a
/// service does before it exits.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "the OTLP exporter did not shut down cleanly");
    }
}

/// The exporting provider for `endpoint`. Built on a thread of its own: the
/// blocking HTTP client must not be made (nor dropped) on a tokio worker.
fn provider(endpoint: &str, service: &'static str) -> Result<SdkTracerProvider, String> {
    let endpoint = endpoint.to_owned();
    std::thread::spawn(move || {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build())
    })
    .join()
    .map_err(|_| "the OTLP exporter's set-up panicked".to_owned())?
}

/// lapin logs every message the broker returns at warn with its whole
/// body: an unroutable AMQP reply or event, that is a booking's or a
/// user's data in the log. The services count and log those themselves,
/// without the body, so lapin's line is kept only when the filter names
/// lapin (docs/configuration.md, `ENTRIP__LOG__LEVEL`).
const QUIET_RETURNS: &str = "lapin::returned_messages=error";

/// The filter's directives: `RUST_LOG` when set and valid, else
/// `log.level` when valid, else `info`; then [`QUIET_RETURNS`] unless they
/// name lapin.
fn filter_directives(rust_log: Option<&str>, level: &str) -> String {
    let valid = |s: &&str| !s.trim().is_empty() && EnvFilter::try_new(s).is_ok();
    let chosen = rust_log
        .filter(valid)
        .or(Some(level).filter(valid))
        .unwrap_or("info");
    if chosen.contains("lapin") {
        chosen.to_owned()
    } else {
        format!("{chosen},{QUIET_RETURNS}")
    }
}

fn install(settings: &LogSettings, service: &'static str, to_stderr: bool) {
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
    let filter = EnvFilter::new(filter_directives(
        std::env::var("RUST_LOG").ok().as_deref(),
        &settings.level,
    ));
    let mut export_error = None;
    let otel = match settings.otlp_endpoint.as_str() {
        "" => None,
        endpoint => match provider(endpoint, service) {
            Ok(provider) => {
                let tracer = provider.tracer(service);
                // A second init (tests) keeps the first provider.
                let _ = PROVIDER.set(provider);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(e) => {
                export_error = Some(e);
                None
            }
        },
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
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
    if let Some(e) = export_error {
        // Tracing export is an aid, not a duty: the service runs without it.
        tracing::error!(endpoint = %settings.otlp_endpoint, error = %e, "spans are not exported");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn the_filter_quiets_lapins_returned_messages_unless_it_names_lapin() {
        let level = "info,sqlx=warn";
        assert_eq!(
            filter_directives(None, level),
            "info,sqlx=warn,lapin::returned_messages=error"
        );
        assert_eq!(
            filter_directives(Some("debug"), level),
            "debug,lapin::returned_messages=error"
        );
        assert_eq!(
            filter_directives(Some("not a =filter=="), level),
            "info,sqlx=warn,lapin::returned_messages=error",
            "an invalid RUST_LOG falls back to log.level"
        );
        assert_eq!(
            filter_directives(None, "  "),
            "info,lapin::returned_messages=error"
        );
        assert_eq!(
            filter_directives(Some("info,lapin=warn"), level),
            "info,lapin=warn"
        );
    }

    /// What the filter lets through, as the services' subscriber writes it.
    fn logged(directives: &str) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new(directives))
            .with(fmt::layer().with_writer(move || Sink(sink.clone())));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "lapin::returned_messages", "Server returned us a message");
            tracing::warn!(target: "entrip_ingest::amqp", "reply could not be routed");
        });
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lapins_returned_message_line_is_not_logged_by_default_and_ours_is() {
        let quiet = logged(&filter_directives(None, "info,sqlx=warn"));
        assert!(!quiet.contains("Server returned us a message"), "{quiet}");
        assert!(quiet.contains("reply could not be routed"), "{quiet}");
        let loud = logged(&filter_directives(Some("info,lapin=warn"), "info"));
        assert!(loud.contains("Server returned us a message"), "{loud}");
    }
}
