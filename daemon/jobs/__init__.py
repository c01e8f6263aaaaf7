"""Jobs on the node: run a job's steps, re-adopt them, keep and upload their output.

- `decide`: pure decisions (which step runs, a target's result, admission
  under max_concurrent and locks, what to upload next).
- `store`: a job's directory (spec, state, per-step status, output).
- `runner_main`: the tiny stdlib-only wrapper every step runs under; it
  records the step's exit status in the job directory.
- `engine`: the driver (queue, spawn, stop, re-adopt, retention).
- `reporter`: ReportJobStatus and UploadJobOutput over the manager link.
"""
