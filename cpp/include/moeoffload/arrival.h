// What happens to an expert's bytes when they reach its device cache slot. An szp expert lands as
// copied; an szpe expert (entropy coded in host memory and over the bus) is transcoded into the szp
// buffers the kernels read, matrix by matrix at the slot offsets the store laid out: on cpu straight
// from the host payload (szpe_to_szp_into), on cuda from the engine's staging copy on its copy stream
// (szpe_to_szp_cuda, the expert's matrices in one launch). The cache holds fixed-width szp either way, so the fused kernels are unchanged.
#pragma once
#include <cstdint>

#include "moeoffload/expert_store.h"
#include "moeoffload/memory.h"
#include "moeoffload/transfer_engine.h"

namespace moeoffload {

// The expansion for expert `id`, or an empty function when it lands as copied.
Expand arrival_for(const ExpertStore& store, uint32_t id, Backend backend);

}  // namespace moeoffload
