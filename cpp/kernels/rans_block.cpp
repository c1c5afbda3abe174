#include "rans_block.h"

namespace moeoffload {
namespace rans_block {

#if MOEOFFLOAD_X86
const ExpandIndex8 kExpandIndex8;
#endif

}  // namespace rans_block
}  // namespace moeoffload
