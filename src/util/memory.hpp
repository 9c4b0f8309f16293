// Giving back memory that only start-up used (docs/performance.md, "Footprint").
#pragma once

namespace tb {

// Unmaps the pages of the program's own code and read-only data, and those of every library it
// loaded, and returns the heap that parsing the configuration left free. The code the loop runs
// faults back in from the page cache on its next use (a minor fault, no I/O); start-up's code
// (the YAML parser, the command line, provisioning, SQLite's parser) stays out. A library's pages
// are shared with the other processes that map it: this process then holds only the ones it
// uses. Clean file pages that no process maps are the first the kernel reclaims; mapped
// executable pages are the last. Only pages that are neither written nor relocated are touched.
// The daemon calls it 10 s after start, 10 s after a reload, and a few seconds after its
// once-a-minute housekeeping (at most once a minute), whose code the loop does not run either.
void release_startup_memory();

}  // namespace tb
