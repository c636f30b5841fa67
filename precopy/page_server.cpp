// The urgent channel after switchover: demand requests answered at once, from a
// snapshot read through the PageReader, while the bulk senders yield.
#include <fmt/format.h>

#include "precopy/source.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"

namespace lazymig::source {
namespace {

// Raised for exactly as long as one request is in service, on every path out.
class GateHold {
public:
    explicit GateHold(DemandGate& g) : g_(g) { g_.enter(); }
    ~GateHold() { g_.leave(); }
    GateHold(const GateHold&) = delete;
    GateHold& operator=(const GateHold&) = delete;

private:
    DemandGate& g_;
};

}  // namespace

Result<void> serve_loop(net::FrameReader& frames, net::Channel& urgent, std::span<const GuestRegion> regions,
                        PageFramer& framer, SentMap& sent, Pusher* pusher, SourceStats& stats, DemandGate& gate,
                        const std::function<Result<void>()>& on_resumed,
                        const std::function<Result<void>()>& on_device_loaded, const std::function<void()>& on_echo,
                        bool resumed, const std::function<Result<void>()>& on_complete) {
    bool loaded = !on_device_loaded;
    for (;;) {
        auto h = frames.next();
        if (!h) return std::unexpected(h.error());
        if (!*h)
            return transport_error(fmt::format("{}: the destination closed the connection before every page arrived",
                                               frames.where()),
                                   ECONNRESET);
        // From the header on: the pushers yield until this reply has left.
        std::optional<GateHold> hold;
        if ((*h)->type == proto::Type::page_request) hold.emplace(gate);
        auto payload = frames.read_control(**h);
        if (!payload) return std::unexpected(payload.error());
        switch ((*h)->type) {
        case proto::Type::device_loaded:
            if (loaded) return peer_violation(fmt::format("{}: unexpected DEVICE_LOADED", frames.where()));
            loaded = true;
            if (auto r = on_device_loaded(); !r) return r;
            continue;
        case proto::Type::resumed:
            if (!loaded) return peer_violation(fmt::format("{}: RESUMED before DEVICE_LOADED", frames.where()));
            if (resumed) return peer_violation(fmt::format("{}: RESUMED twice", frames.where()));
            resumed = true;
            if (auto r = on_resumed(); !r) return r;
            continue;
        case proto::Type::complete:
            if (!resumed) return peer_violation(fmt::format("{}: COMPLETE before RESUMED", frames.where()));
            // An error here: the link died with COMPLETE unread (the source never acts on it).
            if (int e = failpoint::check("source_complete_read", 0, 0, 0))
                return transport_error(fmt::format("{}: failpoint source_complete_read", frames.where()), e);
            LZ_LOG(info, "source_complete", "requests={} demanded={}", stats.requests.get(), stats.demanded_pages.get());
            if (on_complete) return on_complete();
            return {};
        case proto::Type::error:
            return std::unexpected(net::peer_error(*payload, frames.where()));
        case proto::Type::heartbeat: {  // echoed: the destination hears the source is alive
            static const proto::Frame beat = proto::encode_empty(proto::Type::heartbeat);
            if (auto s = net::send_frame(urgent, beat); !s) return s;
            if (on_echo) on_echo();
            continue;
        }
        case proto::Type::page_request:
            break;
        default:
            return peer_violation(fmt::format("{}: unexpected {} after switchover", frames.where(),
                                              proto::to_string((*h)->type)));
        }
        auto req = proto::decode_page_request(*payload);
        if (!req) return std::unexpected(req.error().wrap(frames.where()));
        if (req->region >= regions.size())
            return peer_violation(fmt::format("{}: PAGE_REQUEST for region {}, but there are {} regions",
                                              frames.where(), req->region, regions.size()));
        const std::uint64_t pages = regions[req->region].size / regions[req->region].page_size;
        if (req->first >= pages || req->count > pages - req->first)
            return peer_violation(fmt::format("{}: PAGE_REQUEST for pages {}..{} of region {}, which has {} pages",
                                              frames.where(), req->first, proto::last_page(req->first, req->count),
                                              req->region, pages));
        if (int e = failpoint::check("source_serve_request", req->region, req->first, req->count))
            return sys_error(fmt::format("{}: failpoint source_serve_request", frames.where()), e);
        // Before the reply, so that a sender released by the gate finds it at once.
        if (pusher) pusher->hint(req->region, req->first + req->count);
        const std::uint32_t per_frame = framer.max_pages(req->region);
        for (std::uint32_t done = 0; done < req->count;) {
            const std::uint32_t n = std::min(per_frame, req->count - done);
            auto frame = framer.build(req->region, req->first + done, n);
            if (!frame) return std::unexpected(frame.error().wrap(urgent.where()));
            if (auto s = urgent.send(frame->iov); !s) return s;
            stats.zero_pages.add(frame->zero_pages);
            stats.bytes_sent.add(frame->bytes);
            done += n;
        }
        hold.reset();
        std::uint64_t fresh = 0;
        for (std::uint64_t p = req->first; p < req->first + req->count; ++p) fresh += sent.mark(req->region, p);
        stats.sent_pages.add(fresh);
        stats.requests.add();
        stats.demanded_pages.add(req->count);
    }
}

}  // namespace lazymig::source
