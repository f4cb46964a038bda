//! What one operation of each scenario does, request by request: pull an image, fetch a blob,
//! push a generated image. The runner calls [`Workload::operation`] in a loop per worker.
//!
//! An operation stops at its first failed request (a pull cannot fetch the blobs of a manifest
//! it did not get); the failure is counted by kind and the operation as failed.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use pier_oci::{media, Descriptor, Digest, Manifest, Reference, RepoName, Tag};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::args::{BenchArgs, ImageRef, PullOpts, PushOpts, Scenario};
use crate::client::{scope, Access, Client, Payload, Req, Sink};
use crate::content::{Layer, LayerTemplate};
use crate::error::BenchError;
use crate::stats::{Counters, Failure, Kind, Tally};

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Generated layers are not tar archives, but registries do not look inside layers.
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const OCTET_STREAM: &str = "application/octet-stream";

/// Everything a worker needs to run operations, shared by all workers.
pub struct Workload {
    pub client: Client,
    plan: Plan,
    verify: bool,
    /// Distinguishes this run's tags from earlier runs'.
    run_id: String,
    /// The image pushed last, reported so a following pull has something to fetch.
    pushed: Mutex<Option<ImageRef>>,
}

enum Plan {
    Pull(PullPlan),
    Blob {
        repo: RepoName,
        digest: Digest,
    },
    Push(PushPlan),
    Mixed {
        pull: PullPlan,
        push: PushPlan,
        push_ratio: f64,
    },
}

struct PullPlan {
    images: Vec<ImageRef>,
    manifests_only: bool,
}

struct PushPlan {
    repo: RepoName,
    layers: usize,
    template: Arc<LayerTemplate>,
    chunk: Option<u64>,
    tag: Option<Tag>,
}

/// One worker's own state.
pub struct Worker {
    pub id: usize,
    rng: fastrand::Rng,
    /// Operations this worker started.
    n: u64,
}

impl Worker {
    pub fn new(id: usize) -> Worker {
        Worker {
            id,
            rng: fastrand::Rng::with_seed(fastrand::u64(..) ^ id as u64),
            n: 0,
        }
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

impl Workload {
    /// Check the scenario's arguments, generate push content (on a blocking thread: hashing a
    /// large layer takes a while) and, for a `mixed` run with no `--image`, push the image it
    /// will pull. Nothing done here is measured.
    pub async fn prepare(args: &BenchArgs) -> Result<Workload, BenchError> {
        let client = Client::new(&args.target)?;
        let plan = match &args.scenario {
            Scenario::Pull(p) => {
                if p.pull.images.is_empty() {
                    return Err(BenchError::Usage(
                        "pull needs at least one --image REPO:TAG".into(),
                    ));
                }
                Plan::Pull(pull_plan(&p.pull))
            }
            Scenario::Blob(b) => Plan::Blob {
                repo: b.repo.clone(),
                digest: b.digest.clone(),
            },
            Scenario::Push(p) => Plan::Push(push_plan(&p.push).await?),
            Scenario::Mixed(m) => {
                if !(0.0..=1.0).contains(&m.push_ratio) {
                    return Err(BenchError::Usage(format!(
                        "--push-ratio {} is not between 0 and 1",
                        m.push_ratio
                    )));
                }
                Plan::Mixed {
                    pull: pull_plan(&m.pull),
                    push: push_plan(&m.push).await?,
                    push_ratio: m.push_ratio,
                }
            }
        };
        let mut workload = Workload {
            client,
            plan,
            verify: args.load.verify,
            run_id: format!("{:08x}", (now_nanos() as u64 ^ fastrand::u64(..)) as u32),
            pushed: Mutex::new(None),
        };
        workload.seed().await?;
        Ok(workload)
    }

    /// A `mixed` run without `--image` pulls an image it pushes first.
    async fn seed(&mut self) -> Result<(), BenchError> {
        let Plan::Mixed { pull, push, .. } = &self.plan else {
            return Ok(());
        };
        if !pull.images.is_empty() {
            return Ok(());
        }
        let mut tally = Tally::new(Arc::new(Counters::default()));
        let mut worker = Worker::new(usize::MAX);
        let image = self
            .push(&mut worker, &mut tally, push)
            .await
            .map_err(|f| {
                BenchError::Setup(format!(
                    "pushing the image to pull into {} failed: {}",
                    push.repo,
                    f.label()
                ))
            })?;
        if let Plan::Mixed { pull, .. } = &mut self.plan {
            pull.images.push(image);
        }
        Ok(())
    }

    /// An image this run pushed, if it pushed any.
    pub fn pushed(&self) -> Option<String> {
        let pushed = self.pushed.lock().unwrap_or_else(|e| e.into_inner());
        pushed.as_ref().map(|i| i.to_string())
    }

    /// The scenario's parameters, for the report (so a later run can be compared like for like).
    pub fn options(&self) -> serde_json::Value {
        let pull = |p: &PullPlan| {
            json!({
                "images": p.images.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "manifests_only": p.manifests_only,
            })
        };
        let push = |p: &PushPlan| {
            json!({
                "repo": p.repo.as_str(),
                "layers": p.layers,
                "layer_size": p.template.layer_size(),
                "chunked": p.chunk,
            })
        };
        let mut options = match &self.plan {
            Plan::Pull(p) => pull(p),
            Plan::Blob { repo, digest } => json!({
                "repo": repo.as_str(),
                "digest": digest.to_string(),
            }),
            Plan::Push(p) => push(p),
            Plan::Mixed {
                pull: pl,
                push: ps,
                push_ratio,
            } => json!({ "pull": pull(pl), "push": push(ps), "push_ratio": push_ratio }),
        };
        options["verify"] = json!(self.verify);
        options
    }

    /// Run one operation; false if it failed.
    pub async fn operation(&self, worker: &mut Worker, tally: &mut Tally) -> bool {
        worker.n += 1;
        let result = match &self.plan {
            Plan::Pull(p) => self.pull(worker, tally, p).await,
            Plan::Blob { repo, digest } => self.get_blob(tally, repo, digest).await,
            Plan::Push(p) => self.push(worker, tally, p).await.map(drop),
            Plan::Mixed {
                pull,
                push,
                push_ratio,
            } => {
                if worker.rng.f64() < *push_ratio {
                    self.push(worker, tally, push).await.map(drop)
                } else {
                    self.pull(worker, tally, pull).await
                }
            }
        };
        result.is_ok()
    }

    async fn pull(
        &self,
        worker: &Worker,
        tally: &mut Tally,
        plan: &PullPlan,
    ) -> Result<(), Failure> {
        // Workers start at different images and take them in turn.
        let image = &plan.images[(worker.id.wrapping_add(worker.n as usize)) % plan.images.len()];
        let repo = &image.repo;
        let mut manifest = self.get_manifest(tally, repo, &image.reference).await?;
        if media::is_index(&manifest.media_type) {
            let child = pick_child(&manifest.manifests).ok_or_else(|| {
                tally.error(&Failure::BadManifest);
                Failure::BadManifest
            })?;
            manifest = self
                .get_manifest(tally, repo, &Reference::Digest(child.digest.clone()))
                .await?;
            if !media::is_image_manifest(&manifest.media_type) {
                tally.error(&Failure::BadManifest);
                return Err(Failure::BadManifest);
            }
        }
        if !plan.manifests_only {
            for blob in &manifest.blobs {
                self.get_blob(tally, repo, &blob.digest).await?;
            }
        }
        Ok(())
    }

    async fn get_manifest(
        &self,
        tally: &mut Tally,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Manifest, Failure> {
        let url = self
            .client
            .url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let req = Req::get(url).header(header::ACCEPT, &accept_manifests());
        let sink = match reference {
            Reference::Digest(digest) if self.verify => Sink::Verify {
                digest: digest.clone(),
                keep: true,
            },
            _ => Sink::Keep,
        };
        let scope = scope(repo.as_str(), Access::Pull);
        let done = self
            .client
            .exchange(
                tally,
                Kind::ManifestGet,
                &scope,
                &req,
                &[StatusCode::OK],
                sink,
            )
            .await?;
        Manifest::parse(&done.body, done.header(header::CONTENT_TYPE)).map_err(|_| {
            tally.error(&Failure::BadManifest);
            Failure::BadManifest
        })
    }

    async fn get_blob(
        &self,
        tally: &mut Tally,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), Failure> {
        let url = self.client.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        let sink = if self.verify {
            Sink::Verify {
                digest: digest.clone(),
                keep: false,
            }
        } else {
            Sink::Discard
        };
        let scope = scope(repo.as_str(), Access::Pull);
        self.client
            .exchange(
                tally,
                Kind::BlobGet,
                &scope,
                &Req::get(url),
                &[StatusCode::OK],
                sink,
            )
            .await
            .map(drop)
    }

    /// Push a new image: its layers, its config, then its manifest under a tag.
    async fn push(
        &self,
        worker: &mut Worker,
        tally: &mut Tally,
        plan: &PushPlan,
    ) -> Result<ImageRef, Failure> {
        let scope = scope(plan.repo.as_str(), Access::Push);
        let layers: Vec<Layer> = (0..plan.layers)
            .map(|_| plan.template.layer(&mut worker.rng))
            .collect();
        for layer in &layers {
            let payload = Payload::Layer {
                layer: layer.clone(),
                start: 0,
                end: layer.size,
            };
            self.upload(tally, &scope, plan, &layer.digest, payload)
                .await?;
        }
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.digest.to_string()).collect::<Vec<_>>(),
            },
            "history": [{ "created_by": format!("pier bench {} {} {}", self.run_id, worker.id, worker.n) }],
        }))
        .expect("JSON values serialise");
        let config_digest = Digest::sha256(&config);
        let config_size = config.len();
        self.upload(
            tally,
            &scope,
            plan,
            &config_digest,
            Payload::Bytes(config.into()),
        )
        .await?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size },
            "layers": layers.iter().map(|l| json!({
                "mediaType": OCI_LAYER, "digest": l.digest, "size": l.size,
            })).collect::<Vec<_>>(),
        }))
        .expect("JSON values serialise");
        let tag = match &plan.tag {
            Some(tag) => tag.clone(),
            None => format!("bench-{}-{}-{}", self.run_id, worker.id, worker.n)
                .parse()
                .map_err(|_| Failure::Other)?,
        };
        let req = Req {
            method: Method::PUT,
            url: self
                .client
                .url(&format!("/v2/{}/manifests/{tag}", plan.repo))?,
            headers: content_type(media::OCI_MANIFEST),
            payload: Payload::Bytes(manifest.into()),
        };
        self.client
            .exchange(
                tally,
                Kind::ManifestPut,
                &scope,
                &req,
                &[StatusCode::CREATED],
                Sink::Discard,
            )
            .await?;
        let image = ImageRef {
            repo: plan.repo.clone(),
            reference: Reference::Tag(tag),
        };
        *self.pushed.lock().unwrap_or_else(|e| e.into_inner()) = Some(image.clone());
        Ok(image)
    }

    /// Upload one blob: a monolithic `POST ?digest=`, or POST, PATCH chunks, PUT with
    /// `--chunked`.
    async fn upload(
        &self,
        tally: &mut Tally,
        scope: &str,
        plan: &PushPlan,
        digest: &Digest,
        payload: Payload,
    ) -> Result<(), Failure> {
        let start_url = self
            .client
            .url(&format!("/v2/{}/blobs/uploads/", plan.repo))?;
        let Some(chunk) = plan.chunk else {
            let mut url = start_url;
            url.query_pairs_mut()
                .append_pair("digest", &digest.to_string());
            let req = Req {
                method: Method::POST,
                url,
                headers: content_type(OCTET_STREAM),
                payload: payload.clone(),
            };
            let done = self
                .client
                .exchange(
                    tally,
                    Kind::BlobPut,
                    scope,
                    &req,
                    &[StatusCode::CREATED, StatusCode::ACCEPTED],
                    Sink::Discard,
                )
                .await?;
            if done.status == StatusCode::CREATED {
                return Ok(());
            }
            // The registry opened a session instead of taking the bytes (the specification
            // allows it): PUT them there, as POST-then-PUT.
            let mut url = self.location(tally, &done)?;
            url.query_pairs_mut()
                .append_pair("digest", &digest.to_string());
            let req = Req {
                method: Method::PUT,
                url,
                headers: content_type(OCTET_STREAM),
                payload,
            };
            return self
                .client
                .exchange(
                    tally,
                    Kind::BlobPut,
                    scope,
                    &req,
                    &[StatusCode::CREATED],
                    Sink::Discard,
                )
                .await
                .map(drop);
        };
        let req = Req {
            method: Method::POST,
            url: start_url,
            headers: HeaderMap::new(),
            payload: Payload::Empty,
        };
        let done = self
            .client
            .exchange(
                tally,
                Kind::UploadStart,
                scope,
                &req,
                &[StatusCode::ACCEPTED],
                Sink::Discard,
            )
            .await?;
        let mut location = self.location(tally, &done)?;
        let size = payload.len();
        let mut offset = 0;
        while offset < size {
            let end = (offset + chunk).min(size);
            let mut headers = content_type(OCTET_STREAM);
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("{offset}-{}", end - 1)).expect("digits and a dash"),
            );
            let req = Req {
                method: Method::PATCH,
                url: location,
                headers,
                payload: payload.slice(offset, end),
            };
            let done = self
                .client
                .exchange(
                    tally,
                    Kind::UploadChunk,
                    scope,
                    &req,
                    &[StatusCode::ACCEPTED],
                    Sink::Discard,
                )
                .await?;
            location = self.location(tally, &done)?;
            offset = end;
        }
        location
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let req = Req {
            method: Method::PUT,
            url: location,
            headers: HeaderMap::new(),
            payload: Payload::Empty,
        };
        self.client
            .exchange(
                tally,
                Kind::UploadFinish,
                scope,
                &req,
                &[StatusCode::CREATED],
                Sink::Discard,
            )
            .await
            .map(drop)
    }

    fn location(
        &self,
        tally: &mut Tally,
        done: &crate::client::Done,
    ) -> Result<reqwest::Url, Failure> {
        done.header(header::LOCATION)
            .and_then(|l| self.client.url(l).ok())
            .ok_or_else(|| {
                tally.error(&Failure::Protocol);
                Failure::Protocol
            })
    }
}

fn pull_plan(opts: &PullOpts) -> PullPlan {
    PullPlan {
        images: opts.images.clone(),
        manifests_only: opts.manifests_only,
    }
}

async fn push_plan(opts: &PushOpts) -> Result<PushPlan, BenchError> {
    if opts.layers == 0 {
        return Err(BenchError::Usage("--layers must be at least 1".into()));
    }
    // Shorter layers would leave too few random bytes to be told apart.
    if opts.layer_size < 16 {
        return Err(BenchError::Usage(
            "--layer-size must be at least 16 bytes".into(),
        ));
    }
    if opts.chunked == Some(0) {
        return Err(BenchError::Usage(
            "--chunked must be at least 1 byte".into(),
        ));
    }
    let size = opts.layer_size;
    let seed = fastrand::u64(..);
    let template = tokio::task::spawn_blocking(move || LayerTemplate::new(size, seed))
        .await
        .map_err(|e| BenchError::Setup(format!("generating layer content: {e}")))?;
    Ok(PushPlan {
        repo: opts.repo.clone(),
        layers: opts.layers,
        template: Arc::new(template),
        chunk: opts.chunked,
        tag: opts.tag.clone(),
    })
}

/// The manifest types a pull accepts, as containerd asks for them.
fn accept_manifests() -> String {
    [
        media::OCI_MANIFEST,
        media::OCI_INDEX,
        media::DOCKER_MANIFEST,
        media::DOCKER_MANIFEST_LIST,
    ]
    .join(", ")
}

/// The child of an index a linux/amd64 client would pull, else the first.
fn pick_child(children: &[Descriptor]) -> Option<&Descriptor> {
    children
        .iter()
        .find(|d| {
            d.platform.as_ref().is_some_and(|p| {
                p.get("os").and_then(|v| v.as_str()) == Some("linux")
                    && p.get("architecture").and_then(|v| v.as_str()) == Some("amd64")
            })
        })
        .or_else(|| children.first())
}

fn content_type(value: &'static str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
    headers
}
