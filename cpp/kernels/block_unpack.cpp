#include "block_unpack.h"

namespace moeoffload {
namespace unpack {

const Tables kTables;

}  // namespace unpack
}  // namespace moeoffload
