// Linked into the llama.cpp tools ggq builds (not into llama.cpp itself): when the tool's main()
// returns, drain llama.cpp's asynchronous logger before the process ends. At the pinned commit
// the logger is a leaked singleton that nobody flushes at exit, so a tool's last lines — the
// "Final estimate" of llama-perplexity, its KL-divergence summary — are lost whenever the
// logging thread has not been scheduled yet (llama.cpp issue 22142; about one run in ten on a
// quiet machine, most runs on a loaded one). This changes what is printed, never what is computed.
#include "log.h"

namespace {

struct DrainLogAtExit {
    ~DrainLogAtExit() { common_log_pause(common_log_main()); }  // pause() writes the queue and joins
};

const DrainLogAtExit drain_log_at_exit;

}  // namespace
