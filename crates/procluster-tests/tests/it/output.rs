//! Workers' output captured by the primary and printed line by line with
//! the worker's id.

use crate::orphans::Primary;

#[tokio::test]
async fn prefixed_output_names_each_worker_and_keeps_the_unterminated_tail() {
    let mut primary = Primary::start("print", 2, "prefixed", "disconnect").await;
    primary.go_on().await;
    let mut lines = std::mem::take(&mut primary.lines);
    while let Some(line) = primary.stdout.next_line().await.unwrap() {
        lines.push(line);
    }
    let (status, _) = primary.ended().await;
    assert!(status.success(), "{status}");
    for id in 1..=2 {
        let first = format!("[worker {id}] line one from {id}");
        let tail = format!("[worker {id}] unterminated tail");
        let at = |wanted: &str| lines.iter().position(|l| l == wanted);
        let (Some(first_at), Some(tail_at)) = (at(&first), at(&tail)) else {
            panic!("missing output of worker {id}:\n{}", lines.join("\n"));
        };
        assert!(
            first_at < tail_at,
            "the tail comes last:\n{}",
            lines.join("\n")
        );
    }
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("[worker ")).count(),
        4,
        "{lines:#?}"
    );
}
