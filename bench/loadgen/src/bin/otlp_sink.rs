//! `otlp-sink`: an OTLP/gRPC trace collector that only counts, for the observability benchmark
//! (meshd exporting spans costs what it costs against a collector that answers at once).
//! Prints the span count on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Parser)]
#[command(name = "otlp-sink", about = "OTLP/gRPC collector that counts spans")]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:4317")]
    listen: SocketAddr,
}

#[derive(Default)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = (request.get_ref().resource_spans.iter())
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sink = Sink::default();
    let spans = sink.spans.clone();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve_with_shutdown(args.listen, async {
            let _ = mesh_runtime_signal().await;
        });
    eprintln!("otlp-sink listening on {}", args.listen);
    server.await?;
    println!("spans {}", spans.load(Ordering::Relaxed));
    Ok(())
}

/// SIGINT or SIGTERM.
async fn mesh_runtime_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    }
}
