//! Topics and the patterns that subscribe to them, as NATS subjects: tokens
//! separated by dots; in a pattern `*` stands for exactly one token and a
//! final `>` for one or more.

use super::BusError;

/// Longest topic or pattern, in bytes.
pub(crate) const MAX_TOPIC: usize = 1024;

/// Checks a topic to publish on: dot-separated non-empty tokens, no
/// wildcard.
pub(crate) fn check_topic(topic: &str) -> Result<(), BusError> {
    check_tokens(topic)?;
    if topic.split('.').any(|t| t == "*" || t == ">") {
        return Err(BusError::BadTopic {
            topic: topic.into(),
            why: "wildcards (`*`, `>`) belong in subscriptions, not in a published topic",
        });
    }
    Ok(())
}

fn check_tokens(text: &str) -> Result<(), BusError> {
    let why = if text.is_empty() {
        "it is empty"
    } else if text.len() > MAX_TOPIC {
        "it is longer than 1024 bytes"
    } else if text.split('.').any(str::is_empty) {
        "a token is empty (two dots in a row, or a dot at an end)"
    } else if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "it contains whitespace"
    } else {
        return Ok(());
    };
    Err(BusError::BadTopic {
        topic: text.chars().take(80).collect(),
        why,
    })
}

/// A subscription's pattern: an exact topic, or one with wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    text: String,
    wild: bool,
}

impl Pattern {
    pub(crate) fn parse(text: &str) -> Result<Self, BusError> {
        check_tokens(text)?;
        let tokens: Vec<&str> = text.split('.').collect();
        for (i, token) in tokens.iter().enumerate() {
            if *token == ">" && i + 1 != tokens.len() {
                return Err(BusError::BadTopic {
                    topic: text.into(),
                    why: "`>` may only be the last token",
                });
            }
            if token.len() > 1 && (token.contains('*') || token.contains('>')) {
                return Err(BusError::BadTopic {
                    topic: text.into(),
                    why: "a wildcard must be a whole token (`a.*`, not `a*`)",
                });
            }
        }
        Ok(Self {
            text: text.into(),
            wild: tokens.iter().any(|t| *t == "*" || *t == ">"),
        })
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern has wildcards.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_wild(&self) -> bool {
        self.wild
    }

    /// Whether `topic` (a checked topic) matches.
    pub(crate) fn matches(&self, topic: &str) -> bool {
        if !self.wild {
            return self.text == topic;
        }
        let mut topic = topic.split('.');
        for token in self.text.split('.') {
            match token {
                ">" => return topic.next().is_some(),
                "*" => {
                    if topic.next().is_none() {
                        return false;
                    }
                }
                exact => {
                    if topic.next() != Some(exact) {
                        return false;
                    }
                }
            }
        }
        topic.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, topic: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(topic)
    }

    #[test]
    fn exact_topics_match_only_themselves() {
        assert!(matches("chat.room1", "chat.room1"));
        assert!(!matches("chat.room1", "chat.room2"));
        assert!(!matches("chat", "chat.room1"));
    }

    #[test]
    fn a_star_is_exactly_one_token() {
        assert!(matches("chat.*", "chat.room1"));
        assert!(!matches("chat.*", "chat"));
        assert!(!matches("chat.*", "chat.room1.alice"));
        assert!(matches("*.room1", "chat.room1"));
        assert!(matches("a.*.c", "a.b.c"));
    }

    #[test]
    fn a_final_gt_is_one_token_or_more() {
        assert!(matches("chat.>", "chat.room1"));
        assert!(matches("chat.>", "chat.room1.alice"));
        assert!(!matches("chat.>", "chat"));
        assert!(matches(">", "anything.at.all"));
    }

    #[test]
    fn bad_patterns_and_topics_are_clear_errors() {
        for bad in ["", "a..b", ".a", "a.", "a.>.b", "a*", "a b"] {
            let error = Pattern::parse(bad).unwrap_err().to_string();
            assert!(error.contains("topic"), "{bad:?}: {error}");
        }
        assert!(check_topic("a.*").is_err());
        assert!(check_topic("a.>").is_err());
        assert!(check_topic("a.b").is_ok());
    }
}
