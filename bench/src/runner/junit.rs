//! `testbench run --junit FILE`: a run's verdict as JUnit XML, the format Azure Pipelines' Publish
//! Test Results, GitLab's `artifacts:reports:junit` and Jenkins' JUnit plugin read. One test
//! suite per scenario, one test case per expectation checked ([`Verdict`]); an unmet expectation
//! is a `<failure>` carrying the message the summary prints, a run that could not start or finish
//! is one `<error>` test case named `run`. Owns nothing: it renders strings.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use super::metrics::Verdict;

/// The `classname` prefix of every test case (`testbench.<scenario>`).
const CLASS_PREFIX: &str = "testbench";

/// The report of a finished run: `verdicts` of the scenario `scenario`, which took `elapsed`
/// (wall clock) and started at `started`.
pub fn render(scenario: &str, verdicts: &[Verdict], elapsed: Duration, started: SystemTime) -> String {
    let failures = verdicts.iter().filter(|v| v.failure.is_some()).count();
    let mut cases = String::new();
    for v in verdicts {
        let _ = write!(
            cases,
            "    <testcase classname=\"{CLASS_PREFIX}.{}\" name=\"{}\" time=\"0\"",
            escape(scenario),
            escape(&v.key)
        );
        match &v.failure {
            None => cases.push_str("/>\n"),
            Some(why) => {
                let _ = write!(
                    cases,
                    ">\n      <failure type=\"UnmetExpectation\" message=\"{}\">{}</failure>\n    </testcase>\n",
                    escape(why),
                    escape(why)
                );
            }
        }
    }
    document(scenario, verdicts.len(), failures, 0, elapsed, started, &cases)
}

/// The report of a run that could not start or finish: one test case `run` with the error.
pub fn render_error(scenario: &str, error: &str, elapsed: Duration, started: SystemTime) -> String {
    let case = format!(
        "    <testcase classname=\"{CLASS_PREFIX}.{}\" name=\"run\" time=\"{:.3}\">\n      <error type=\"RunError\" message=\"{}\">{}</error>\n    </testcase>\n",
        escape(scenario),
        elapsed.as_secs_f64(),
        escape(error),
        escape(error)
    );
    document(scenario, 1, 0, 1, elapsed, started, &case)
}

fn document(
    scenario: &str,
    tests: usize,
    failures: usize,
    errors: usize,
    elapsed: Duration,
    started: SystemTime,
    cases: &str,
) -> String {
    let time = elapsed.as_secs_f64();
    let stamp = iothub_emulator::clock::iso8601(
        started.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    );
    // JUnit's timestamp has no zone suffix or fraction.
    let stamp = stamp.get(..19).unwrap_or(&stamp);
    let name = escape(scenario);
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <testsuites name=\"testbench\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{time:.3}\">\n  \
         <testsuite name=\"{name}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"0\" time=\"{time:.3}\" timestamp=\"{stamp}\">\n\
         {cases}  </testsuite>\n</testsuites>\n"
    )
}

/// Text for an XML attribute or element: the five special characters escaped, and characters XML
/// 1.0 does not allow (controls other than tab, newline, carriage return) replaced by `?`.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(key: &str, failure: Option<&str>) -> Verdict {
        Verdict { key: key.into(), failure: failure.map(Into::into) }
    }

    #[test]
    fn one_case_per_expectation_and_failures_carry_the_message() {
        let xml = render(
            "release <1>",
            &[
                verdict("time_limit", None),
                verdict(
                    "expect.final_version",
                    Some("expect.final_version: 2 of 10 devices are not on \"2.0\""),
                ),
            ],
            Duration::from_millis(1500),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000),
        );
        assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites "), "{xml}");
        assert!(xml.contains("tests=\"2\" failures=\"1\" errors=\"0\" time=\"1.500\""), "{xml}");
        assert!(xml.contains("<testsuite name=\"release &lt;1&gt;\""), "{xml}");
        assert!(xml.contains("timestamp=\"2025-11-24T16:00:00\""), "{xml}");
        assert!(
            xml.contains(
                "<testcase classname=\"testbench.release &lt;1&gt;\" name=\"time_limit\" time=\"0\"/>"
            ),
            "{xml}"
        );
        assert!(
            xml.contains("<failure type=\"UnmetExpectation\" message=\"expect.final_version: 2 of 10 devices are not on &quot;2.0&quot;\">"),
            "{xml}"
        );
        assert_eq!(xml.matches("<testcase ").count(), 2);
    }

    #[test]
    fn a_run_error_is_one_error_case() {
        let xml = render_error("s", "setup: port in use\u{1}", Duration::ZERO, SystemTime::UNIX_EPOCH);
        assert!(xml.contains("tests=\"1\" failures=\"0\" errors=\"1\""), "{xml}");
        assert!(xml.contains("name=\"run\""), "{xml}");
        assert!(xml.contains("<error type=\"RunError\" message=\"setup: port in use?\">"), "{xml}");
    }
}
