//! An ACME order's life as a state machine: states named for what they wait for, moved by one
//! pure transition function (RFC 8555 §7.1.6 order status → our next step).

use instant_acme::OrderStatus;

/// Where an order stands, from our side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderProgress {
    /// Nothing ordered yet: send newOrder (RFC 8555 §7.4).
    ExpectOrder,
    /// Order "pending": answer its authorizations' challenges (RFC 8555 §7.5).
    ExpectAuthorizations,
    /// Order "ready": send the CSR to the finalize URL (RFC 8555 §7.4).
    ExpectFinalize,
    /// Order "processing" or "valid": fetch the certificate (RFC 8555 §7.4.2).
    ExpectCertificate,
    /// The certificate chain arrived (PEM).
    Issued(String),
    /// The CA marked the order "invalid", or it cannot progress; the problem in words.
    Failed(String),
}

/// What happened since the last step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    /// The CA reported the order's status (after newOrder, a refresh, challenge answers or finalize).
    Observed {
        /// RFC 8555 §7.1.6 status.
        status: OrderStatus,
        /// The order's `error` field (RFC 8555 §7.1.3), as text.
        problem: Option<String>,
    },
    /// The certificate chain was downloaded.
    Downloaded(String),
}

impl OrderProgress {
    /// The one transition function.
    pub fn next(self, event: OrderEvent) -> Self {
        match (self, event) {
            (done @ (Self::Issued(_) | Self::Failed(_)), _) => done,
            (Self::ExpectCertificate, OrderEvent::Downloaded(chain)) => Self::Issued(chain),
            (_, OrderEvent::Downloaded(_)) => {
                Self::Failed("a certificate arrived for an order that was not finalized".into())
            }
            (_, OrderEvent::Observed { status, problem }) => match status {
                OrderStatus::Pending => Self::ExpectAuthorizations,
                OrderStatus::Ready => Self::ExpectFinalize,
                OrderStatus::Processing | OrderStatus::Valid => Self::ExpectCertificate,
                OrderStatus::Invalid => Self::Failed(
                    problem.unwrap_or_else(|| "the CA marked the order invalid".into()),
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(status: OrderStatus) -> OrderEvent {
        OrderEvent::Observed {
            status,
            problem: None,
        }
    }

    /// The happy path of RFC 8555 §7.1.6's order state diagram:
    /// pending → ready → processing → valid.
    #[test]
    fn happy_path_follows_rfc8555_state_diagram() {
        let progress = OrderProgress::ExpectOrder.next(observed(OrderStatus::Pending));
        assert_eq!(progress, OrderProgress::ExpectAuthorizations);
        let progress = progress.next(observed(OrderStatus::Ready));
        assert_eq!(progress, OrderProgress::ExpectFinalize);
        let progress = progress.next(observed(OrderStatus::Processing));
        assert_eq!(progress, OrderProgress::ExpectCertificate);
        let progress = progress.next(OrderEvent::Downloaded("PEM".into()));
        assert_eq!(progress, OrderProgress::Issued("PEM".into()));
    }

    /// A resumed order may already be ready or valid (authorization reuse, or a restart after
    /// finalize): the machine jumps straight to the matching step.
    #[test]
    fn resumed_order_jumps_to_matching_step() {
        assert_eq!(
            OrderProgress::ExpectOrder.next(observed(OrderStatus::Valid)),
            OrderProgress::ExpectCertificate
        );
        assert_eq!(
            OrderProgress::ExpectAuthorizations.next(observed(OrderStatus::Ready)),
            OrderProgress::ExpectFinalize
        );
    }

    #[test]
    fn invalid_order_fails_with_the_cas_problem() {
        let progress = OrderProgress::ExpectAuthorizations.next(OrderEvent::Observed {
            status: OrderStatus::Invalid,
            problem: Some("unauthorized: 404 for /.well-known/acme-challenge/x".into()),
        });
        assert_eq!(
            progress,
            OrderProgress::Failed("unauthorized: 404 for /.well-known/acme-challenge/x".into())
        );
    }

    #[test]
    fn terminal_states_stay_terminal() {
        let issued = OrderProgress::Issued("PEM".into());
        assert_eq!(issued.clone().next(observed(OrderStatus::Invalid)), issued);
    }

    /// Order status strings exactly as RFC 8555 §7.1.3's example shows them.
    #[test]
    fn rfc8555_status_strings_decode() {
        let status: OrderStatus = serde_json::from_str("\"pending\"").unwrap();
        assert_eq!(status, OrderStatus::Pending);
        let status: OrderStatus = serde_json::from_str("\"processing\"").unwrap();
        assert_eq!(status, OrderStatus::Processing);
    }
}
