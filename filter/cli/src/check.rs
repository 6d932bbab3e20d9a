//! `check FILE`: validate a policy with the filter's own rules, every problem with its JSON path.

use std::path::Path;

use crate::input::PolicyFile;
use crate::{UsageError, Verdict};

/// Prints `OK …` or one line per problem (`PATH: MESSAGE`).
pub(crate) fn run(file: &Path) -> Result<Verdict, UsageError> {
    let policy = PolicyFile::read(file)?;
    match policy.compile() {
        Ok(Some(policy)) => {
            println!(
                "OK {}: policy version {:?}, {} site(s)",
                file.display(),
                policy.version(),
                policy.site_count()
            );
            Ok(Verdict::Pass)
        }
        Ok(None) => {
            println!(
                "OK {}: a plugin configuration with a feed and no inline policy",
                file.display()
            );
            Ok(Verdict::Pass)
        }
        Err(problems) => {
            println!("INVALID {}: {} problem(s)", file.display(), problems.len());
            for problem in problems {
                println!("  {problem}");
            }
            Ok(Verdict::Fail)
        }
    }
}
