// The urgent channel after switchover: demand requests answered at once.
#include <fmt/format.h>

#include "precopy/source.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"

namespace lazymig::source {

Result<void> serve_loop(net::FrameReader& reader, net::Channel& urgent, std::span<const GuestRegion> regions,
                        SentMap& sent, HintQueue& hints, SourceStats& stats, const std::function<Result<void>()>& on_resumed) {
    PageFramer framer(regions);
    bool resumed = false;
    for (;;) {
        auto h = reader.next();
        if (!h) return std::unexpected(h.error());
        if (!*h)
            return sys_error(fmt::format("{}: the destination closed the connection before every page arrived",
                                         reader.where()), ECONNRESET);
        auto payload = reader.read_control(**h);
        if (!payload) return std::unexpected(payload.error());
        switch ((*h)->type) {
        case proto::Type::resumed:
            if (resumed) return logic_error(fmt::format("{}: RESUMED twice", reader.where()));
            resumed = true;
            if (auto r = on_resumed(); !r) return r;
            continue;
        case proto::Type::complete:
            if (!resumed) return logic_error(fmt::format("{}: COMPLETE before RESUMED", reader.where()));
            LZ_LOG(info, "source_complete", "requests={} demanded={}", stats.requests.get(), stats.demanded_pages.get());
            return {};
        case proto::Type::error:
            return std::unexpected(net::peer_error(*payload, reader.where()));
        case proto::Type::page_request:
            break;
        default:
            return logic_error(fmt::format("{}: unexpected {} after switchover", reader.where(),
                                           proto::to_string((*h)->type)));
        }
        auto req = proto::decode_page_request(*payload);
        if (!req) return std::unexpected(req.error().wrap(reader.where()));
        if (req->region >= regions.size())
            return logic_error(fmt::format("{}: PAGE_REQUEST for region {}, but there are {} regions", reader.where(),
                                           req->region, regions.size()));
        const std::uint64_t pages = regions[req->region].size / regions[req->region].page_size;
        if (req->first >= pages || req->count > pages - req->first)
            return logic_error(fmt::format("{}: PAGE_REQUEST for pages {}..{} of region {}, which has {} pages",
                                           reader.where(), req->first, proto::last_page(req->first, req->count), req->region, pages));
        if (int e = failpoint::check("source_serve_request", req->region, req->first, req->count))
            return sys_error(fmt::format("{}: failpoint source_serve_request", reader.where()), e);
        std::uint64_t zeros = 0;
        std::size_t bytes = 0;
        auto iov = framer.build(req->region, req->first, req->count, &zeros, &bytes);
        if (auto s = urgent.send(iov); !s) return s;
        std::uint64_t fresh = 0;
        for (std::uint64_t p = req->first; p < req->first + req->count; ++p) fresh += sent.mark(req->region, p);
        stats.sent_pages.add(fresh);
        stats.requests.add();
        stats.demanded_pages.add(req->count);
        stats.zero_pages.add(zeros);
        stats.bytes_sent.add(bytes);
        hints.push(req->region, req->first + req->count);
    }
}

}  // namespace lazymig::source
