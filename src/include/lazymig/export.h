/* lazymig/export.h — which declarations are liblazymig's ABI.
 *
 * liblazymig.so is built with hidden visibility by default (-fvisibility=hidden on the
 * library and on the static internals linked into it), so only declarations marked
 * LAZYMIG_API are exported: the C ABI (lazymig_*) and the public C++ classes and
 * functions of lazymig.hpp. On a class the attribute also exports its vtable and
 * typeinfo, which a VMM needs to derive, delete through a base pointer or dynamic_cast.
 * The same attribute on the consumer side is harmless, so there is one definition.
 */
#ifndef LAZYMIG_EXPORT_H
#define LAZYMIG_EXPORT_H

#if defined(__GNUC__) || defined(__clang__)
#define LAZYMIG_API __attribute__((visibility("default")))
#else
#define LAZYMIG_API
#endif

#endif /* LAZYMIG_EXPORT_H */
