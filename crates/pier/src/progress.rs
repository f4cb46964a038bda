//! What the long commands against a node (`pier warm`, `pier import`, `pier export`,
//! `pier sync run`) share: how one starts (`--url` checked, a runtime of its own), its progress
//! bar on a terminal, and how what became of each thing it asked for makes its exit status.

use std::fmt::Display;
use std::future::Future;
use std::io::IsTerminal as _;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::remote;

/// The node's base URL from `--url`, or exit status 2 with what is wrong with it told.
pub fn base(url: &str) -> Result<String, ExitCode> {
    remote::base_url(url).map_err(|message| {
        eprintln!("pier: {message}");
        ExitCode::from(remote::EXIT_UNREACHABLE)
    })
}

/// Run `command` with the endpoint `{base}{api}` on a runtime of its own; a runtime that
/// cannot start is told as the endpoint being unreachable.
pub fn run<F: Future<Output = ExitCode>>(
    url: &str,
    api: &str,
    command: impl FnOnce(String) -> F,
) -> ExitCode {
    let endpoint = match base(url) {
        Ok(base) => format!("{base}{api}"),
        Err(code) => return code,
    };
    match remote::runtime() {
        Ok(rt) => rt.block_on(command(endpoint)),
        Err(e) => remote::unreachable(&endpoint, &format!("cannot start the async runtime: {e}")),
    }
}

/// Whether to draw progress bars: only on a terminal, and never beside JSON lines.
pub fn bars_wanted(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// A progress bar on stderr drawn with `template` (its `{bar}` filled with `=> `) and
/// `prefix`, or a hidden one when `shown` is false.
pub fn bar(shown: bool, len: Option<u64>, template: &str, prefix: String) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(prefix);
    bar
}

/// Exit status 0 when what was asked happened, 1 when it did not.
pub fn done(ok: bool) -> ExitCode {
    ExitCode::from(if ok {
        remote::EXIT_OK
    } else {
        remote::EXIT_NOT_DONE
    })
}

/// Tell why what was asked did not happen (`pier: {why}`), and give exit status 1.
pub fn not_done(why: impl Display) -> ExitCode {
    eprintln!("pier: {why}");
    ExitCode::from(remote::EXIT_NOT_DONE)
}

/// What became of asking the node for one thing.
pub enum Outcome {
    /// The node answered; whether what was asked happened.
    Answered(bool),
    /// The node was never asked: the trouble was here (and has been told).
    NotAsked,
    /// The node could not be asked, for this cause.
    Unreachable(String),
}

/// The exit status of a command that asks for one thing after the other: 0 when every one
/// happened, 1 when one did not, 2 when the node never answered at all.
pub struct Tally<'a> {
    verb: &'a str,
    endpoint: &'a str,
    all_ok: bool,
    reached: bool,
}

impl<'a> Tally<'a> {
    /// `verb` names the command in its messages (`warm`, `import`).
    pub fn new(verb: &'a str, endpoint: &'a str) -> Tally<'a> {
        Tally {
            verb,
            endpoint,
            all_ok: true,
            reached: false,
        }
    }

    /// Count what became of `item`; `Err` with the exit status when the command stops here.
    pub fn count(&mut self, item: impl Display, outcome: Outcome) -> Result<(), ExitCode> {
        match outcome {
            Outcome::Answered(ok) => {
                self.reached = true;
                self.all_ok &= ok;
            }
            Outcome::NotAsked => self.all_ok = false,
            // A node that never answered is down or the URL is wrong: asking again for the
            // next item would only repeat the same message.
            Outcome::Unreachable(cause) if !self.reached => {
                return Err(remote::unreachable(self.endpoint, &cause));
            }
            Outcome::Unreachable(cause) => {
                eprintln!(
                    "pier: {} {item}: cannot reach {}: {cause}",
                    self.verb, self.endpoint
                );
                self.all_ok = false;
            }
        }
        Ok(())
    }

    /// The exit status once every item is counted.
    pub fn exit(self) -> ExitCode {
        done(self.all_ok)
    }
}

/// Why the node refused, from its answer: the OCI error's messages, or else the status.
pub fn refusal(status: reqwest::StatusCode, body: &[u8]) -> String {
    remote::oci_error_message(body).unwrap_or_else(|| format!("the node answered {status}"))
}
