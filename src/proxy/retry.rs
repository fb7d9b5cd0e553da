//! Whether a failed attempt is tried again on another target: a pure
//! function of what happened, so every rule reads in one place and is
//! tested as a table.

use crate::upstream::RetryOn;
use pingora::{Error, ErrorSource, ErrorType, RetryType};

/// How an attempt failed, as `retry_on` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No connection to the target: nothing of the request reached it.
    ConnectFailure,
    /// The connection broke after the request was (partly) sent, or the
    /// answer was not valid HTTP.
    Reset,
    /// No answer within the read or write timeout.
    Timeout,
}

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    pub kind: FailureKind,
    /// The timeout (if that is the kind) came while waiting to read from
    /// the upstream, not to write to it.
    pub reading: bool,
    /// The upstream failed (not the client, not the gateway).
    pub from_upstream: bool,
    /// An idle pooled connection the upstream had already closed: the
    /// request never reached it.
    pub stale_pooled: bool,
    pub idempotent: bool,
    /// The client's whole body was received, and kept for a replay.
    pub body_replayable: bool,
    /// The client's body is still arriving.
    pub body_incomplete: bool,
    /// A final response head already went to the client.
    pub response_started: bool,
    /// Failed attempts so far, this one included.
    pub failures: u32,
    pub retries: u32,
    pub retry_on: RetryOn,
    /// The route's timeout has passed.
    pub past_deadline: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try another target; `counts` says whether this failure uses up one
    /// of the upstream's `retries`.
    Retry {
        counts: bool,
    },
    Stop,
    /// The upstream's read timer ran out while the client was still
    /// sending its body: each piece of body restarts that timer, so the
    /// client stalled. Its timeout (408), not the upstream's.
    ClientStalled,
}

impl FailureKind {
    /// For an error after the connection was made.
    pub fn of(e: &Error) -> FailureKind {
        match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => FailureKind::Timeout,
            _ => FailureKind::Reset,
        }
    }
}

impl Failure {
    /// The facts of an error seen after connecting, `client_reused` as
    /// Pingora reports it.
    pub fn stale_pooled(e: &Error, client_reused: bool) -> bool {
        client_reused && matches!(e.retry, RetryType::ReusedOnly)
    }

    pub fn from_upstream(e: &Error) -> bool {
        *e.esource() == ErrorSource::Upstream
    }
}

/// The decision for one failed attempt.
pub fn decide(f: &Failure) -> Decision {
    if f.kind == FailureKind::Timeout && f.reading && f.from_upstream && f.body_incomplete {
        return Decision::ClientStalled;
    }
    let listed = match f.kind {
        FailureKind::ConnectFailure => f.retry_on.connect_failure,
        FailureKind::Reset => f.retry_on.reset,
        FailureKind::Timeout => f.retry_on.timeout,
    };
    if f.kind == FailureKind::ConnectFailure {
        // Nothing reached the target: any method may go elsewhere.
        return if listed && f.failures <= f.retries && !f.past_deadline {
            Decision::Retry { counts: true }
        } else {
            Decision::Stop
        };
    }
    // The request may have reached the target: only an idempotent request,
    // failed by the upstream (a client that left is not a reason to ask
    // another target), whose whole body can be sent again, before any
    // answer went to the client.
    let replayable = f.from_upstream && f.idempotent && f.body_replayable && !f.response_started;
    if !replayable {
        return Decision::Stop;
    }
    if f.stale_pooled {
        return Decision::Retry { counts: false };
    }
    if listed && f.failures <= f.retries && !f.past_deadline {
        Decision::Retry { counts: true }
    } else {
        Decision::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(kind: FailureKind) -> Failure {
        Failure {
            kind,
            reading: true,
            from_upstream: true,
            stale_pooled: false,
            idempotent: true,
            body_replayable: true,
            body_incomplete: false,
            response_started: false,
            failures: 1,
            retries: 1,
            retry_on: RetryOn::default(),
            past_deadline: false,
        }
    }

    #[test]
    fn the_retry_rules_as_a_table() {
        use Decision::*;
        use FailureKind::*;
        let all = RetryOn {
            connect_failure: true,
            reset: true,
            timeout: true,
        };
        let none = RetryOn {
            connect_failure: false,
            reset: false,
            timeout: false,
        };
        let cases: Vec<(&str, Failure, Decision)> = vec![
            (
                "connect failure, GET",
                base(ConnectFailure),
                Retry { counts: true },
            ),
            (
                "connect failure, POST",
                Failure {
                    idempotent: false,
                    ..base(ConnectFailure)
                },
                Retry { counts: true },
            ),
            (
                "connect failure, retries used up",
                Failure {
                    failures: 2,
                    ..base(ConnectFailure)
                },
                Stop,
            ),
            (
                "connect failure not in retry_on",
                Failure {
                    retry_on: none,
                    ..base(ConnectFailure)
                },
                Stop,
            ),
            (
                "connect failure past the route timeout",
                Failure {
                    past_deadline: true,
                    ..base(ConnectFailure)
                },
                Stop,
            ),
            ("reset, GET", base(Reset), Retry { counts: true }),
            (
                "reset, POST",
                Failure {
                    idempotent: false,
                    ..base(Reset)
                },
                Stop,
            ),
            (
                "reset after the response started",
                Failure {
                    response_started: true,
                    ..base(Reset)
                },
                Stop,
            ),
            (
                "reset with a body too large to replay",
                Failure {
                    body_replayable: false,
                    ..base(Reset)
                },
                Stop,
            ),
            (
                "reset caused by the client",
                Failure {
                    from_upstream: false,
                    ..base(Reset)
                },
                Stop,
            ),
            (
                "reset not in retry_on",
                Failure {
                    retry_on: none,
                    ..base(Reset)
                },
                Stop,
            ),
            ("timeout, not in retry_on by default", base(Timeout), Stop),
            (
                "timeout listed",
                Failure {
                    retry_on: all,
                    ..base(Timeout)
                },
                Retry { counts: true },
            ),
            (
                "read timeout while the client still sends",
                Failure {
                    body_incomplete: true,
                    body_replayable: false,
                    retry_on: all,
                    ..base(Timeout)
                },
                ClientStalled,
            ),
            (
                "write timeout while the client still sends",
                Failure {
                    reading: false,
                    body_incomplete: true,
                    body_replayable: false,
                    retry_on: all,
                    ..base(Timeout)
                },
                Stop,
            ),
            (
                "stale pooled connection",
                Failure {
                    stale_pooled: true,
                    failures: 5,
                    ..base(Reset)
                },
                Retry { counts: false },
            ),
            (
                "stale pooled connection, POST",
                Failure {
                    stale_pooled: true,
                    idempotent: false,
                    ..base(Reset)
                },
                Stop,
            ),
        ];
        for (what, failure, expected) in cases {
            assert_eq!(decide(&failure), expected, "{what}");
        }
    }
}
